"""Argument types shared by the operator commands (`manage.py …`).

An argparse `type` turns a bad value into a clear error naming the option
("argument --amount: '1e3' is not an amount in USD"), which Django reports and exits
non-zero with, before the command does anything.
"""

from __future__ import annotations

from argparse import ArgumentTypeError

from apps.billing.money import MoneyError, Nano, parse_usd
from apps.tenancy.models import Organization
from apps.tenancy.selectors import organization_get_by_slug


def usd(text: str) -> Nano:
    """An amount in USD (zero allowed), as nano-dollars."""
    try:
        return parse_usd(text)
    except MoneyError as exc:
        raise ArgumentTypeError(str(exc)) from None


def positive_usd(text: str) -> Nano:
    """An amount in USD that moves money: more than zero."""
    try:
        return parse_usd(text, allow_zero=False)
    except MoneyError as exc:
        raise ArgumentTypeError(str(exc)) from None


def organization(slug: str) -> Organization:
    org = organization_get_by_slug(slug=slug)
    if org is None:
        raise ArgumentTypeError(f"no organization with slug {slug!r}")
    return org
