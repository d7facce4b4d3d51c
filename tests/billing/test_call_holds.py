"""A call's hold covers its worst case: its prompt at the dearest prompt rate (a prompt
may turn out to be written whole to the upstream's cache), and all the output it may
have. On PostgreSQL and on SQLite, by whichever path the hold takes there."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.billing.models import Account, HoldStatus
from apps.billing.money import call_cost_nano, parse_usd
from apps.billing.services import account_id_for_organization, credit_grant, hold_place_for_call
from apps.catalog.services import price_set
from apps.usage.services import call_settle
from tests.billing.holds import quote_for_50_tokens
from tests.usage.test_reconcile_and_rollups import call_outcome


@pytest.fixture
def claude_price(db):
    """claude-sonnet-4 at $3 in, $0.30 cache read, $3.75 cache write, $15 out per 1M."""
    return price_set(
        model_name="claude-sonnet-4",
        input_nano_per_mtok=parse_usd("3.00"),
        cached_input_nano_per_mtok=parse_usd("0.30"),
        cache_write_nano_per_mtok=parse_usd("3.75"),
        output_nano_per_mtok=parse_usd("15.00"),
    )


def _hold(org, price, request_id: str, max_tokens: int | None):
    return hold_place_for_call(
        account_id=account_id_for_organization(organization_id=org.pk),
        key=None,
        request_id=request_id,
        expires_at=timezone.now() + timedelta(minutes=5),
        quote=quote_for_50_tokens(price, max_tokens),
    )


def _all_written(price, completion_tokens: int) -> int:
    """The cost of the 50-token prompt written whole to the cache, and this much output."""
    return call_cost_nano(
        prompt_tokens=50,
        cached_tokens=0,
        cache_write_tokens=50,
        completion_tokens=completion_tokens,
        rates=price,
    )


def test_a_hold_prices_the_prompt_at_the_cache_write_rate_when_it_is_the_dearest(
    funded_org, claude_price
):
    hold, max_tokens = _hold(funded_org, claude_price, "chatcmpl-held", max_tokens=200)
    assert max_tokens == 200
    assert hold.amount_nano == 50 * 3_750 + 200 * 15_000 == _all_written(claude_price, 200)


def test_a_call_capped_by_its_balance_is_capped_at_the_worst_case_and_settles_within_it(
    org, api_key, claude_price
):
    credit_grant(organization=org, amount_nano=parse_usd("0.001"))
    hold, max_tokens = _hold(org, claude_price, "chatcmpl-capped", max_tokens=None)
    # $0.001 affords the prompt written whole to the cache ($0.0001875) and 54 output
    # tokens ($0.00081); at the input rate it would have let 56 through.
    assert max_tokens == 54
    assert hold.amount_nano == _all_written(claude_price, 54) == 997_500

    outcome = call_outcome(org, api_key, claude_price, "chatcmpl-capped", completion_tokens=54)
    outcome = replace(outcome, model="claude-sonnet-4", cached_tokens=0, cache_write_tokens=50)
    record = call_settle(hold=hold, outcome=outcome, rates=claude_price)
    assert record.cost_nano == record.charged_nano == hold.amount_nano
    hold.refresh_from_db()
    assert hold.status == HoldStatus.SETTLED
    account = Account.objects.get(organization=org)
    assert (account.balance_nano, account.held_nano) == (2_500, 0)
