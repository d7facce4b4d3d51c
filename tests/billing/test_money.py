from __future__ import annotations

from dataclasses import dataclass

import pytest

from apps.billing.money import (
    MoneyError,
    affordable_completion_tokens,
    call_cost_nano,
    format_usd,
    parse_usd,
)


@dataclass
class Rates:
    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int


GPT4O = Rates(2_500_000_000, 10_000_000_000, 1_250_000_000)  # $2.50 / $10 / $1.25 per 1M


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


def test_call_cost_bills_cached_tokens_at_the_cached_rate_and_never_twice():
    # 1000 prompt tokens of which 400 cached, 100 completion tokens.
    cost = call_cost_nano(prompt_tokens=1000, cached_tokens=400, completion_tokens=100, rates=GPT4O)
    assert cost == 600 * 2_500 + 400 * 1_250 + 100 * 10_000


def test_call_cost_rounds_once_half_up_at_the_end():
    rates = Rates(1, 1, 1)  # one nano-dollar per million tokens
    assert (
        call_cost_nano(prompt_tokens=499_999, cached_tokens=0, completion_tokens=0, rates=rates)
        == 0
    )
    assert (
        call_cost_nano(prompt_tokens=500_000, cached_tokens=0, completion_tokens=0, rates=rates)
        == 1
    )
    # Rounding per component would give 0 + 0; rounding the sum once gives 1.
    assert (
        call_cost_nano(
            prompt_tokens=300_000, cached_tokens=0, completion_tokens=300_000, rates=rates
        )
        == 1
    )


def test_call_cost_refuses_impossible_counts():
    with pytest.raises(ValueError, match="cached within prompt"):
        call_cost_nano(prompt_tokens=1, cached_tokens=2, completion_tokens=0, rates=GPT4O)


@pytest.mark.parametrize("available", [0, 1, 4_999, 25_000, 123_456_789, 10**10])
@pytest.mark.parametrize("prompt", [0, 1, 10, 1000])
def test_affordable_tokens_is_the_exact_inverse_of_the_cost(available, prompt):
    k = affordable_completion_tokens(available_nano=available, prompt_tokens=prompt, rates=GPT4O)
    if k < 0:
        assert (
            call_cost_nano(prompt_tokens=prompt, cached_tokens=0, completion_tokens=0, rates=GPT4O)
            > available
        )
        return
    fits = call_cost_nano(prompt_tokens=prompt, cached_tokens=0, completion_tokens=k, rates=GPT4O)
    over = call_cost_nano(
        prompt_tokens=prompt, cached_tokens=0, completion_tokens=k + 1, rates=GPT4O
    )
    assert fits <= available < over
