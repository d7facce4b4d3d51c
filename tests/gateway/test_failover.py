"""Failover between channels, against a live real200: a channel that fails before it
accepted the call is passed over for the next; when every channel fails the customer gets
OpenAI's error shape and pays nothing; an upstream that refuses the request itself is not
asked again elsewhere."""

from __future__ import annotations

import pytest

from apps.catalog.models import Channel
from apps.catalog.selectors import routes_forget
from apps.usage.models import EndReason, UsageSource
from tests.fakes import text_for
from tests.gateway.conftest import cost_of
from tests.gateway.test_errors import assert_error
from tests.openapi import assert_valid
from tests.servers import free_port

pytestmark = pytest.mark.postgres

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}


def refuse_connections(*names: str) -> None:
    """Point channels at a port where nothing listens."""
    for name in names:
        Channel.objects.filter(name=name).update(base_url=f"http://127.0.0.1:{free_port()}/v1")
    routes_forget()


def call(live, stream: bool):
    """Make the call; return the response and, for a stream, its events."""
    if stream:
        return live.stream({**BODY, "stream": True})
    return live.post(BODY), None


def answer_text(response, events) -> str:
    """The text of a successful answer, whole or streamed, each part validated."""
    assert response.status_code == 200, response.text
    if events is None:
        assert_valid("CreateChatCompletionResponse", response.json())
        return response.json()["choices"][0]["message"]["content"]
    *chunks, done = events
    assert done == "[DONE]"
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def forget_calls(*fakes) -> None:
    for fake in fakes:
        fake.calls.clear()


@pytest.mark.parametrize("failure", ["500", "503", "429", "401", "refused", "slow"])
def test_a_channel_that_fails_before_accepting_is_passed_over_for_the_next(live, backup, failure):
    if failure == "refused":
        refuse_connections("primary")
    elif failure == "slow":
        live.set_timeouts(0.2)
        live.upstream.configure(header_delay=2.0)
    else:
        live.upstream.configure(fail_status=int(failure))
    backup.configure(tokens=4, prompt_tokens=9)
    for settled, stream in enumerate((False, True), start=1):
        forget_calls(live.upstream, backup)
        before = live.balance_nano()
        assert answer_text(*call(live, stream)) == text_for(4)
        assert len(live.upstream.calls) == (0 if failure == "refused" else 1)
        assert len(backup.calls) == 1
        assert backup.calls[0].headers["authorization"] == "Bearer sk-backup-secret"
        record = live.wait_settled(settled)[-1]
        assert record.is_stream == stream
        assert record.channel_id == Channel.objects.get(name="backup").pk
        assert record.end_reason == EndReason.DONE
        assert record.usage_source == UsageSource.UPSTREAM
        assert (record.prompt_tokens, record.completion_tokens) == (9, 4)
        assert live.balance_nano() == before - cost_of(record)


def fail_everywhere(live, backup, failure: str) -> None:
    if failure == "refused":
        refuse_connections("primary", "backup")
    elif failure == "timeout":
        live.set_timeouts(0.2)
        for fake in (live.upstream, backup):
            fake.configure(header_delay=2.0)
    elif failure == "mixed":
        live.upstream.configure(fail_status=429)
        backup.configure(fail_status=500)
    else:
        for fake in (live.upstream, backup):
            fake.configure(fail_status=int(failure))


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        ("500", 502, "upstream_error"),
        ("refused", 502, "upstream_error"),
        ("mixed", 502, "upstream_error"),
        ("429", 503, "upstream_unavailable"),
        ("timeout", 504, "upstream_timeout"),
    ],
)
def test_when_every_channel_fails_the_call_fails_in_openais_shape_and_costs_nothing(
    live, backup, failure, status, code
):
    fail_everywhere(live, backup, failure)
    before, ledger = live.balance_nano(), live.ledger_size()
    for settled, stream in enumerate((False, True), start=1):
        forget_calls(live.upstream, backup)
        response, _events = call(live, stream)
        error = assert_error(response, status, "api_error", code=code)
        assert "sk-" not in error["message"]
        expected_calls = 0 if failure == "refused" else 1
        assert (len(live.upstream.calls), len(backup.calls)) == (expected_calls, expected_calls)
        record = live.wait_settled(settled)[-1]
        assert record.request_id == response.headers["x-request-id"]
        assert record.status_code == status
        assert record.end_reason == EndReason.UPSTREAM_ERROR
        assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
        assert (record.cost_nano, record.charged_nano, record.transfer_id) == (0, 0, None)
        assert live.held_nano() == 0
    assert live.balance_nano() == before
    assert live.ledger_size() == ledger


def test_a_request_the_upstream_refuses_is_answered_with_its_status_and_not_retried(live, backup):
    live.upstream.configure(fail_status=400)
    before = live.balance_nano()
    for settled, stream in enumerate((False, True), start=1):
        forget_calls(live.upstream, backup)
        response, _events = call(live, stream)
        assert_error(response, 400, "invalid_request_error", code="upstream_rejected")
        assert len(live.upstream.calls) == 1
        assert backup.calls == []
        record = live.wait_settled(settled)[-1]
        assert record.status_code == 400
        assert record.charged_nano == 0
        assert live.held_nano() == 0
    assert live.balance_nano() == before


def test_a_disabled_channel_is_never_called(live, backup):
    Channel.objects.filter(name="primary").update(is_enabled=False)
    routes_forget()
    assert live.post(BODY).status_code == 200
    assert live.upstream.calls == []
    assert len(backup.calls) == 1


def test_the_higher_priority_channel_is_tried_first(live, backup):
    for _ in range(3):
        assert live.post(BODY).status_code == 200
    assert (len(live.upstream.calls), len(backup.calls)) == (3, 0)
