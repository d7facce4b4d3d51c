"""POST /v1/chat/completions against a live real200, through the official openai SDK,
with real HTTP servers on 127.0.0.1 standing in for the upstream providers."""

from __future__ import annotations

import pytest

from apps.billing.money import call_cost_nano
from apps.catalog.models import Price
from apps.usage.models import EndReason, UsageSource
from tests.openapi import assert_valid

pytestmark = pytest.mark.postgres


def _cost(record) -> int:
    price = Price.objects.get(pk=record.price_id)
    return call_cost_nano(
        prompt_tokens=record.prompt_tokens,
        cached_tokens=record.cached_tokens,
        completion_tokens=record.completion_tokens,
        rates=price,
    )


def test_a_non_streamed_call_is_openai_shaped_and_billed_exactly(live):
    before = live.balance_nano()
    live.upstream.configure(tokens=7, prompt_tokens=21, cached_tokens=5)
    raw = live.sdk.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "请用三句话介绍你自己。"}], max_tokens=50
    )
    answer = raw.parse()
    body = raw.http_response.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["id"].startswith("chatcmpl-") and raw.headers["x-request-id"] == body["id"]
    assert body["model"] == "gpt-4o"
    assert answer.choices[0].message.content == "The quick brown fox jumps over the"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (21, 7)
    assert answer.usage.prompt_tokens_details.cached_tokens == 5
    sent = live.upstream.calls[-1]
    assert sent.body["model"] == "gpt-4o-2024-08-06"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    (record,) = live.records()
    assert record.request_id == body["id"]
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (21, 5, 7)
    assert record.usage_source == UsageSource.UPSTREAM and record.end_reason == EndReason.DONE
    expected = 16 * 2_500 + 5 * 1_250 + 7 * 10_000
    assert record.cost_nano == record.charged_nano == expected == _cost(record)
    assert live.balance_nano() == before - expected
    assert live.held_nano() == 0
