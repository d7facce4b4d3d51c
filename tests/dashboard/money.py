"""Helpers for the money half of the dashboard's tests: settled calls made through the
real billing and usage services, and the pages' addresses."""

from __future__ import annotations

from datetime import datetime

import time_machine
from django.test import Client

from apps.billing.services import KeyBudget, account_for_organization
from apps.catalog.models import Price
from apps.keys.models import ApiKey
from apps.tenancy.models import Organization, User
from apps.usage.models import EndReason, RollupPeriod, UsageRecord, UsageSource
from apps.usage.services import CallOutcome, call_settle, rollups_refresh
from tests.billing.holds import hold_of


def login(client: Client, user: User) -> Client:
    client.force_login(user)
    return client


def post_for_messages(client: Client, url: str, data: dict[str, str]) -> list[str]:
    """Post a balance form, follow its redirect back to the balance page, and return the
    messages that page shows (showing them clears them, so none carry over)."""
    response = client.post(url, data, follow=True)
    assert [url for url, _status in response.redirect_chain] == [balance_url(url.split("/")[2])]
    return [str(message) for message in response.context["messages"]]


def settled_call(
    org: Organization,
    key: ApiKey | None,
    price: Price,
    request_id: str,
    *,
    at: datetime | None = None,
    prompt_tokens: int = 50,
    cached_tokens: int = 10,
    cache_write_tokens: int = 0,
    completion_tokens: int = 100,
    status_code: int = 200,
    end_reason: str = EndReason.DONE,
    latency_ms: int = 12,
) -> UsageRecord:
    """A call held and settled as the gateway does it (the organization must have the
    money), at `at` if given."""

    def settle() -> UsageRecord:
        hold = hold_of(
            account_for_organization(organization=org),
            10**7,
            request_id,
            key=KeyBudget(key_id=key.pk, budget_nano=None) if key else None,
        )
        outcome = CallOutcome(
            request_id=request_id,
            organization_id=org.pk,
            api_key_id=key.pk if key else None,
            model=price.model.name,
            price_id=price.pk,
            channel_id=None,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens,
            completion_tokens=completion_tokens,
            usage_source=UsageSource.UPSTREAM,
            end_reason=end_reason,
            status_code=status_code,
            is_stream=False,
            latency_ms=latency_ms,
            ttft_ms=5,
        )
        return call_settle(hold=hold, outcome=outcome, rates=price)

    if at is None:
        return settle()
    with time_machine.travel(at, tick=False):
        return settle()


def refresh_daily_rollups(since: datetime) -> None:
    rollups_refresh(since=since, period=RollupPeriod.DAY)


def balance_url(slug: str = "acme") -> str:
    return f"/o/{slug}/balance/"


def usage_url(slug: str = "acme") -> str:
    return f"/o/{slug}/usage/"
