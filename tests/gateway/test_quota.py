"""402 insufficient_quota, the output cap a small balance puts on a call, and the balance
moving by exactly what each call cost, against a live real200."""

from __future__ import annotations

import httpx
import openai
import pytest

from apps.billing.models import Hold
from apps.billing.money import affordable_completion_tokens, call_cost_nano, format_usd, parse_usd
from apps.catalog.models import Price
from apps.gateway.tokens import count_prompt_tokens
from apps.usage.models import UsageRecord
from tests.gateway.conftest import cost_of, sse_events
from tests.openapi import assert_valid

pytestmark = pytest.mark.postgres

MESSAGES = [{"role": "user", "content": "Hi"}]
PROMPT = count_prompt_tokens(MESSAGES, "gpt-4o")


def gpt4o() -> Price:
    return Price.objects.filter(model__name="gpt-4o").latest()


def affordable(balance: str) -> int:
    return affordable_completion_tokens(
        available_nano=parse_usd(balance), prompt_tokens=PROMPT, rates=gpt4o()
    )


def cost(completion_tokens: int) -> int:
    return call_cost_nano(
        prompt_tokens=PROMPT,
        cached_tokens=0,
        cache_write_tokens=0,
        completion_tokens=completion_tokens,
        rates=gpt4o(),
    )


def assert_refused_for_quota(live, key: str, body: dict) -> dict:
    """A 402 in OpenAI's shape after which nothing moved: no transfer, no hold, no usage
    record, no upstream call. Returns the error object."""
    ledger, holds = live.ledger_size(), Hold.objects.count()
    response = live.post(body, key=key)
    assert response.status_code == 402, response.text
    assert response.headers["x-request-id"]
    assert_valid("ErrorResponse", response.json())
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert live.ledger_size() == ledger
    assert Hold.objects.count() == holds
    assert not UsageRecord.objects.exists()
    assert live.upstream.calls == []
    return error


def test_a_max_tokens_the_balance_cannot_cover_is_a_402_saying_what_it_affords(live):
    key = live.key_for(balance="0.001")
    error = assert_refused_for_quota(
        live, key, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1000}
    )
    assert error["balance"] == "0.001000000"
    assert error["estimated_cost"] == format_usd(cost(1000))
    assert error["affordable_max_tokens"] == affordable("0.001") > 0
    assert str(affordable("0.001")) in error["message"]


def test_a_balance_short_of_the_prompt_and_a_short_reply_is_a_402(live, settings):
    key = live.key_for(balance="0.00005")
    assert 0 < affordable("0.00005") < settings.GATEWAY_MIN_REPLY_TOKENS
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    error = assert_refused_for_quota(live, key, body)
    assert error["balance"] == "0.000050000"
    assert error["estimated_cost"] == format_usd(cost(settings.GATEWAY_MIN_REPLY_TOKENS))
    assert error["affordable_max_tokens"] == affordable("0.00005")


def test_an_empty_balance_is_a_402_affording_nothing(live):
    key = live.key_for(balance="0")
    error = assert_refused_for_quota(live, key, {"model": "gpt-4o", "messages": MESSAGES})
    assert error["balance"] == "0.000000000"
    assert error["affordable_max_tokens"] == 0


def test_a_keys_budget_is_a_limit_like_the_balance(live):
    key = live.key_for(budget_nano=parse_usd("0.0001"))
    error = assert_refused_for_quota(
        live, key, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 500}
    )
    assert error["balance"] == "0.000100000"
    assert "budget" in error["message"]


def test_the_sdk_sees_a_402(live):
    client = openai.OpenAI(
        base_url=f"{live.url}/v1", api_key=live.key_for(balance="0"), max_retries=0
    )
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_quota"


@pytest.mark.parametrize("stream", [False, True])
def test_without_max_tokens_a_small_balance_caps_the_call_at_what_it_affords(live, stream):
    key = live.key_for(balance="0.001")
    org_id = live.org_of(key)
    cap = affordable("0.001")
    assert 16 <= cap < 4096
    # The upstream talks for as long as it may, and counts the prompt as we do.
    live.upstream.configure(tokens=5000, prompt_tokens=PROMPT)
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": stream}
    response = live.post(body, key=key)
    assert response.status_code == 200, response.text
    if stream:
        assert sse_events(response.text)[-1] == "[DONE]"
    assert live.upstream.calls[-1].body["max_tokens"] == cap
    (record,) = live.wait_settled(org_id=org_id)
    assert record.completion_tokens == cap
    assert record.charged_nano == record.cost_nano == cost(cap) == cost_of(record)
    account = live.account(org_id)
    assert account.balance_nano == parse_usd("0.001") - record.charged_nano >= 0
    assert account.held_nano == 0


def test_the_balance_never_goes_below_zero_when_the_upstream_counts_more_prompt(live):
    key = live.key_for(balance="0.001")
    org_id = live.org_of(key)
    cap = affordable("0.001")
    live.upstream.configure(tokens=5000, prompt_tokens=PROMPT + 50)
    response = live.post({"model": "gpt-4o", "messages": MESSAGES}, key=key)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == cap
    record = UsageRecord.objects.get(organization_id=org_id)
    assert record.cost_nano == cost_of(record) > parse_usd("0.001")
    assert record.charged_nano == parse_usd("0.001")  # all there was, and no more
    account = live.account(org_id)
    assert (account.balance_nano, account.held_nano) == (0, 0)


def test_open_holds_count_against_the_balance(live):
    key = live.key_for(balance="0.001")
    org_id = live.org_of(key)
    live.upstream.configure(tokens=60, pace=0.01)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 60}
    url, headers = f"{live.url}/v1/chat/completions", {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers) as first:
        lines = first.iter_lines()
        next(lines)  # the first call is under way: its hold is placed
        assert live.account(org_id).held_nano == cost(60)
        second = live.post(body, key=key)
        assert list(lines)[-2] == "data: [DONE]"
    assert second.status_code == 402
    assert second.json()["error"]["balance"] == format_usd(parse_usd("0.001") - cost(60))
    assert len(live.upstream.calls) == 1
