"""Settling a call: the usage record, the ledger charge and the hold's release, together."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.billing.models import Hold
from apps.billing.money import Rates, call_cost_nano
from apps.billing.services import hold_settle
from apps.keys.models import ApiKey
from apps.usage.models import UsageRecord

# last_used_at is for people ("used 3 minutes ago"); writing it on every call would make
# each key row a hot spot, so it moves at most once a minute.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """Everything settlement needs to know about one finished call (plain values, so a
    retry task can carry it)."""

    request_id: str
    organization_id: int
    api_key_id: int | None
    model: str
    price_id: int
    channel_id: int | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    usage_source: str
    end_reason: str
    status_code: int
    is_stream: bool
    latency_ms: int
    ttft_ms: int | None


def call_settle(*, hold: Hold, outcome: CallOutcome, rates: Rates) -> UsageRecord | None:
    """Charge a finished call and close its hold, exactly once, in one transaction.

    The hold is claimed by a conditional update (see `hold_settle`): a second settlement
    of the same call finds it closed and returns the first record, changing nothing; the
    unique `request_id` and one-to-one transfer make a double charge impossible even
    past that. Returns None if the hold had been released instead (the call was given up
    for dead): nothing is charged then.
    """
    cost = call_cost_nano(
        prompt_tokens=outcome.prompt_tokens,
        cached_tokens=outcome.cached_tokens,
        completion_tokens=outcome.completion_tokens,
        rates=rates,
    )
    with transaction.atomic():
        settled, transfer, charged = hold_settle(
            hold=hold, cost_nano=cost, memo=f"{outcome.model} {outcome.request_id}"
        )
        if not settled:
            return UsageRecord.objects.filter(request_id=outcome.request_id).first()
        record = UsageRecord.objects.create(
            request_id=outcome.request_id,
            organization_id=outcome.organization_id,
            api_key_id=outcome.api_key_id,
            model=outcome.model,
            price_id=outcome.price_id,
            channel_id=outcome.channel_id,
            transfer=transfer,
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            completion_tokens=outcome.completion_tokens,
            cost_nano=cost,
            charged_nano=charged,
            usage_source=outcome.usage_source,
            end_reason=outcome.end_reason,
            status_code=outcome.status_code,
            is_stream=outcome.is_stream,
            latency_ms=outcome.latency_ms,
            ttft_ms=outcome.ttft_ms,
        )
        if outcome.api_key_id is not None:
            now = timezone.now()
            ApiKey.objects.filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION),
                pk=outcome.api_key_id,
            ).update(last_used_at=now)
    return record
