"""Holds placed the way the gateway places them, through `hold_place_for_call`: of a
given amount, or for a call of a usual shape."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from apps.billing.models import Account, Hold
from apps.billing.money import TOKENS_PER_QUOTE, Nano, Rates
from apps.billing.services import CallQuote, KeyBudget, hold_place_for_call


@dataclass(frozen=True)
class _OneNanoPerPromptToken:
    """Rates under which a call costs one nano-dollar per prompt token and nothing for
    its output: a prompt of N tokens costs exactly N, with nothing to round."""

    input_nano_per_mtok: int = TOKENS_PER_QUOTE
    output_nano_per_mtok: int = 0
    cached_input_nano_per_mtok: int = 0
    cache_write_nano_per_mtok: int = 0


def hold_of(
    account: Account,
    amount_nano: Nano,
    request_id: str,
    *,
    key: KeyBudget | None = None,
    expires_at: datetime | None = None,
) -> Hold:
    """Hold exactly `amount_nano` of the account's spendable balance (and of the key's
    budget) for the call `request_id`, expiring at `expires_at` (default: in 5 minutes).

    Raises what `hold_place_for_call` raises when the money is not there
    (CallNotAffordable, an InsufficientFunds); nothing is held then."""
    quote = CallQuote(
        prompt_tokens=amount_nano,
        max_tokens=1,
        output_cap=1,
        n=1,
        rates=_OneNanoPerPromptToken(),
        min_reply_tokens=1,
    )
    hold, max_tokens = hold_place_for_call(
        account_id=account.pk,
        key=key,
        request_id=request_id,
        expires_at=expires_at or timezone.now() + timedelta(minutes=5),
        quote=quote,
    )
    assert (hold.amount_nano, max_tokens) == (amount_nano, 1), (hold.amount_nano, max_tokens)
    return hold


def quote_for_50_tokens(rates: Rates, max_tokens: int | None = 200) -> CallQuote:
    """The quote of a call of 50 prompt tokens and up to `max_tokens` output tokens (None:
    as many as the money affords, up to 4,096)."""
    return CallQuote(
        prompt_tokens=50,
        max_tokens=max_tokens,
        output_cap=4_096,
        n=1,
        rates=rates,
        min_reply_tokens=16,
    )
