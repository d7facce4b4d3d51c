"""The money unit, its parsing and formatting, and the one rounding rule.

Unit: integer nano-dollars (1 unit = 10⁻⁹ USD), stored in BigIntegerFields and passed
around as `int`. Prices are integer nano-dollars per million tokens. USD is the only
currency. A float never holds money: amounts from people arrive as strings, go through
`parse_usd` once, and input finer than one unit is refused rather than rounded.

Rounding: the exact cost of a call is an integer number of nano-dollars times a token
count over one million; it is rounded once, half up, at the end (`_div_round_half_up`),
never per component. Nothing else in the code base multiplies a price by a token count.

This module imports nothing from the project, so any app may use the unit (the keys app
parses a key's budget with it) without depending on the books.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Protocol

Nano = int

NANO_PER_USD = 10**9
NANO_PER_CENT = NANO_PER_USD // 100
TOKENS_PER_QUOTE = 10**6  # prices are quoted per million tokens
_PLACES = 9  # digits after the point in one unit
# Plain decimal notation only: "1e3" is a thousand dollars to Python but a typo to a person.
_AMOUNT = re.compile(r"^\d+(\.\d+)?$")


class MoneyError(ValueError):
    """An amount that cannot be taken as USD (the message says why)."""


class Rates(Protocol):
    """Prices of one model, nano-dollars per million tokens (catalog.Price has these)."""

    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    cache_write_nano_per_mtok: int


def parse_usd(text: str, *, allow_zero: bool = True) -> Nano:
    """`"12.34"` → 12_340_000_000. Refuses negatives, non-numbers and sub-unit precision."""
    if not isinstance(text, str):
        raise MoneyError("an amount must be given as text, e.g. '12.50'")
    stripped = text.strip()
    if stripped.startswith("-") and _AMOUNT.match(stripped[1:]):
        raise MoneyError(f"{text!r} is negative")
    if not _AMOUNT.match(stripped):
        raise MoneyError(f"{text!r} is not an amount in USD (write it like 12.50)")
    try:
        amount = Decimal(stripped)
    except InvalidOperation:
        raise MoneyError(f"{text!r} is not an amount in USD") from None
    if amount == 0 and not allow_zero:
        raise MoneyError("the amount must be more than zero")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise MoneyError(f"{text!r} is finer than one nano-dollar (9 decimal places)")
    return int(nano)


def format_usd(nano: Nano, places: int = _PLACES) -> str:
    """12_340_000_000 → `"12.340000000"`; with fewer places, rounded half up for display."""
    if not 0 <= places <= _PLACES:
        raise ValueError("places must be between 0 and 9")
    sign = "-" if nano < 0 else ""
    scaled = _div_round_half_up(abs(nano), 10 ** (_PLACES - places))
    whole, frac = divmod(scaled, 10**places)
    return f"{sign}{whole}.{frac:0{places}d}" if places else f"{sign}{whole}"


def _div_round_half_up(numerator: int, denominator: int) -> int:
    """The one rounding rule: exact integer division, rounded half up (for numerator ≥ 0)."""
    whole, rest = divmod(numerator, denominator)
    return whole + (1 if 2 * rest >= denominator else 0)


def call_cost_nano(
    *,
    prompt_tokens: int,
    cached_tokens: int,
    cache_write_tokens: int,
    completion_tokens: int,
    rates: Rates,
) -> Nano:
    """Cost of one call. The only place a price meets a token count.

    `prompt_tokens` counts every prompt token (OpenAI's meaning); `cached_tokens` is the
    part of it read from a prompt cache and `cache_write_tokens` the part written to one,
    each billed at its own rate instead of the input rate.
    """
    if min(prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens) < 0:
        raise ValueError("token counts must be non-negative")
    if cached_tokens + cache_write_tokens > prompt_tokens:
        raise ValueError("cache reads and writes are parts of the prompt: within prompt_tokens")
    exact = (
        (prompt_tokens - cached_tokens - cache_write_tokens) * rates.input_nano_per_mtok
        + cached_tokens * rates.cached_input_nano_per_mtok
        + cache_write_tokens * rates.cache_write_nano_per_mtok
        + completion_tokens * rates.output_nano_per_mtok
    )
    return _div_round_half_up(exact, TOKENS_PER_QUOTE)


def _dearest_prompt_rate(rates: Rates) -> int:
    """What a prompt token may cost at most. Before a call nobody knows how much of its
    prompt the upstream will read from its cache or write to it (a write costs more than
    plain input at Anthropic), so the worst case prices every prompt token at the dearest
    of the three rates."""
    return max(
        rates.input_nano_per_mtok, rates.cached_input_nano_per_mtok, rates.cache_write_nano_per_mtok
    )


def worst_case_cost_nano(*, prompt_tokens: int, completion_tokens: int, rates: Rates) -> Nano:
    """The most a call of this size can cost, however its prompt turns out to be split
    between input, cache reads and cache writes: what a hold must cover, so that a
    settlement never exceeds its hold because of the cache.

    `call_cost_nano` is linear in that split, so its maximum is the whole prompt at the
    dearest rate; rounded by the same rule, it is never less than the cost of any split.
    """
    exact = (
        prompt_tokens * _dearest_prompt_rate(rates) + completion_tokens * rates.output_nano_per_mtok
    )
    return _div_round_half_up(exact, TOKENS_PER_QUOTE)


def affordable_completion_tokens(*, available_nano: Nano, prompt_tokens: int, rates: Rates) -> int:
    """The most output tokens whose worst-case cost, with this prompt, fits in
    `available_nano`.

    The inverse of `worst_case_cost_nano` under the same rounding: cost ≤ available exactly
    when 2·exact < (2·available + 1)·10⁶. Returns -1 if even the prompt does not fit.
    A model with a zero output price affords any length: the caller caps it.
    """
    prompt_exact = prompt_tokens * _dearest_prompt_rate(rates)
    budget = (2 * available_nano + 1) * TOKENS_PER_QUOTE - 2 * prompt_exact
    if budget <= 0:
        return -1
    per_token = 2 * rates.output_nano_per_mtok
    if per_token == 0:
        return 2**62
    return -(-budget // per_token) - 1
