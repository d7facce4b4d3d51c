"""Money for people, in templates: `{{ amount_nano|usd }}` and `{{ price_nano|usd_price }}`.

Formatting only; every amount arrives computed, in nano-dollars (apps/billing/money.py).
"""

from __future__ import annotations

from django import template

from apps.billing.money import Nano, format_usd

register = template.Library()


@register.filter
def usd(nano: Nano | None, places: int = 2) -> str:
    """`12_340_000_000|usd` → "$12.34"; `|usd:6` for per-call costs. None shows as "—"."""
    if nano is None:
        return "—"
    text = format_usd(nano, int(places))
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


@register.filter
def usd_price(nano: Nano) -> str:
    """A price per million tokens with as many places as it needs, from 2 to 6:
    $2.50, $0.075, $0.000150 (anything finer is rounded half up to 6 places)."""
    text = format_usd(nano, 6)
    whole, frac = text.split(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"
