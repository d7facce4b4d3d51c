from __future__ import annotations

from dataclasses import dataclass

import pytest

from apps.billing.money import (
    MoneyError,
    affordable_completion_tokens,
    call_cost_nano,
    format_usd,
    parse_usd,
    worst_case_cost_nano,
)


@dataclass
class Rates:
    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    cache_write_nano_per_mtok: int


# USD per 1M tokens: input, output, cache read, cache write.
GPT4O = Rates(2_500_000_000, 10_000_000_000, 1_250_000_000, 2_500_000_000)  # 2.50/10/1.25/2.50
CLAUDE = Rates(3_000_000_000, 15_000_000_000, 300_000_000, 3_750_000_000)  # 3/15/0.30/3.75


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("12.34", 12_340_000_000),
        ("0", 0),
        ("0.000000001", 1),
        (" 5 ", 5_000_000_000),
        ("007.50", 7_500_000_000),
    ],
)
def test_parse_usd_reads_exact_amounts(text, nano):
    assert parse_usd(text) == nano


@pytest.mark.parametrize(
    "text", ["-1", "abc", "", "NaN", "Infinity", "0.0000000001", "1,5", "1e3", "+5", ".5", "5."]
)
def test_parse_usd_refuses_what_is_not_an_exact_amount(text):
    with pytest.raises(MoneyError):
        parse_usd(text)


def test_parse_usd_refuses_a_float_and_zero_when_asked():
    with pytest.raises(MoneyError):
        parse_usd(1.5)  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        parse_usd("0", allow_zero=False)


def test_format_usd_shows_every_digit_of_the_unit_and_rounds_half_up_for_display():
    assert format_usd(12_340_000_000) == "12.340000000"
    assert format_usd(1) == "0.000000001"
    assert format_usd(-1_500_000_000) == "-1.500000000"
    assert format_usd(12_345_000_000, 2) == "12.35"
    assert format_usd(12_344_999_999, 2) == "12.34"
    assert format_usd(7, 0) == "0"


def cost(rates: Rates, prompt: int, completion: int, *, cached: int = 0, written: int = 0) -> int:
    return call_cost_nano(
        prompt_tokens=prompt,
        cached_tokens=cached,
        cache_write_tokens=written,
        completion_tokens=completion,
        rates=rates,
    )


def test_call_cost_bills_cached_tokens_at_the_cached_rate_and_never_twice():
    # 1000 prompt tokens of which 400 cached, 100 completion tokens.
    assert cost(GPT4O, 1000, 100, cached=400) == 600 * 2_500 + 400 * 1_250 + 100 * 10_000


def test_call_cost_bills_cache_writes_at_the_cache_write_rate_and_never_twice():
    # 1000 prompt tokens: 500 plain input, 200 read from the cache, 300 written to it.
    assert cost(CLAUDE, 1000, 50, cached=200, written=300) == (
        500 * 3_000 + 200 * 300 + 300 * 3_750 + 50 * 15_000
    )
    assert cost(CLAUDE, 1000, 50, cached=200, written=300) == 3_435_000
    # At the input rate (what a price set before cache-write rates has), nothing changes.
    assert cost(GPT4O, 1000, 100, cached=400, written=300) == cost(GPT4O, 1000, 100, cached=400)


def test_call_cost_rounds_once_half_up_at_the_end():
    rates = Rates(1, 1, 1, 1)  # one nano-dollar per million tokens
    assert cost(rates, 499_999, 0) == 0
    assert cost(rates, 500_000, 0) == 1
    # Rounding per component would give 0 + 0; rounding the sum once gives 1.
    assert cost(rates, 300_000, 300_000) == 1


def test_call_cost_rounds_cache_writes_into_the_one_rounding():
    rates = Rates(1, 0, 0, 3)  # nano-dollars per million tokens: input 1, cache write 3
    # 200,000 plain input (0.2 nano) and 100,000 written (0.3 nano): 0.5, rounded up once.
    # Rounded per component, each would be 0.
    assert cost(rates, 300_000, 0, written=100_000) == 1
    assert cost(rates, 299_999, 0, written=100_000) == 0


@pytest.mark.parametrize(
    ("prompt", "cached", "written", "completion"),
    [(1, 2, 0, 0), (1, 0, 2, 0), (10, 6, 5, 0), (10, -1, 0, 0), (10, 0, -1, 0), (10, 0, 0, -1)],
)
def test_call_cost_refuses_impossible_counts(prompt, cached, written, completion):
    with pytest.raises(ValueError, match=r"non-negative|within prompt_tokens"):
        cost(GPT4O, prompt, completion, cached=cached, written=written)


def test_call_cost_takes_a_prompt_that_is_all_cache_reads_and_writes():
    assert cost(CLAUDE, 10, 0, cached=4, written=6) == 4 * 300 + 6 * 3_750


@pytest.mark.parametrize("rates", [GPT4O, CLAUDE, Rates(3, 1, 5, 4), Rates(0, 0, 0, 0)])
@pytest.mark.parametrize(("prompt", "completion"), [(0, 0), (1, 1), (333, 0), (1000, 77)])
def test_the_worst_case_is_the_most_any_split_of_the_prompt_can_cost(rates, prompt, completion):
    worst = worst_case_cost_nano(prompt_tokens=prompt, completion_tokens=completion, rates=rates)
    splits = [
        cost(rates, prompt, completion, cached=cached, written=written)
        for cached in range(0, prompt + 1, max(prompt // 7, 1))
        for written in range(0, prompt - cached + 1, max(prompt // 5, 1))
    ]
    assert max(splits) <= worst
    # It is reached: by the prompt at the dearest of its rates.
    assert worst in {
        cost(rates, prompt, completion),
        cost(rates, prompt, completion, cached=prompt),
        cost(rates, prompt, completion, written=prompt),
    }


def test_the_worst_case_of_a_claude_prompt_is_all_of_it_written_to_the_cache():
    worst = worst_case_cost_nano(prompt_tokens=1000, completion_tokens=100, rates=CLAUDE)
    assert worst == 1000 * 3_750 + 100 * 15_000 == cost(CLAUDE, 1000, 100, written=1000)
    assert worst > cost(CLAUDE, 1000, 100)  # the input rate alone would hold too little


@pytest.mark.parametrize("rates", [GPT4O, CLAUDE])
@pytest.mark.parametrize("available", [0, 1, 4_999, 25_000, 123_456_789, 10**10])
@pytest.mark.parametrize("prompt", [0, 1, 10, 1000])
def test_affordable_tokens_is_the_exact_inverse_of_the_worst_case(rates, available, prompt):
    def worst(completion: int) -> int:
        return worst_case_cost_nano(prompt_tokens=prompt, completion_tokens=completion, rates=rates)

    k = affordable_completion_tokens(available_nano=available, prompt_tokens=prompt, rates=rates)
    if k < 0:
        assert worst(0) > available
        return
    assert worst(k) <= available < worst(k + 1)
