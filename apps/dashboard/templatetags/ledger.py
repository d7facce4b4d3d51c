"""Ledger amounts for people: `{{ transfer.signed_nano|usd_signed }}` → "+$10.00",
"-$0.000075". Formatting only, with the places an amount needs (see `usd_price`)."""

from __future__ import annotations

from django import template

from apps.billing.money import Nano
from apps.dashboard.templatetags.money import usd_price

register = template.Library()


@register.filter
def usd_signed(nano: Nano) -> str:
    """Money in with a plus, money out with a minus, so a column reads without colour."""
    sign = "+" if nano > 0 else "-" if nano < 0 else ""
    return f"{sign}{usd_price(abs(nano))}"
