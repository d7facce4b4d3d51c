"""An upstream that answers 200 with a body of the wrong shape (a misconfigured base URL
pointing at another service, a buggy server) fails the call as a broken upstream does:
502 in OpenAI's error shape (an error event once a stream has begun), the call settled,
nothing billed. OpenAI- and Anthropic-shaped channels."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from apps.catalog.models import Channel
from apps.catalog.selectors import routes_forget
from apps.usage.models import EndReason
from tests.openapi import assert_valid
from tests.servers import asgi_in_thread

pytestmark = pytest.mark.postgres

MESSAGE = {"role": "assistant", "content": "Hi"}

# Each: the choices of a whole answer (a stream sends them as one chunk's, with each
# message as the delta).
MALFORMED = {
    "choices not a list": "oops",
    "a choice not an object": ["oops"],
    "a message not an object": [{"message": "Hi", "finish_reason": "stop"}],
    "a message of empty text": [{"message": "", "finish_reason": "stop"}],
    "an index not a number": [{"index": "a", "message": MESSAGE, "finish_reason": "stop"}],
    "tool calls not a list": [{"message": {**MESSAGE, "tool_calls": "x"}}],
    "a tool call not an object": [{"message": {**MESSAGE, "tool_calls": ["x"]}}],
    "arguments not text": [
        {"message": {**MESSAGE, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}}
    ],
}


def answering(choices: Any, *, stream: bool):
    async def upstream(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if stream:
            if isinstance(choices, list):
                chunk = [
                    {**c, "delta": c.get("message")} if isinstance(c, dict) else c for c in choices
                ]
            else:
                chunk = choices
            body = b"data: " + orjson.dumps({"choices": chunk}) + b"\n\ndata: [DONE]\n\n"
            kind = b"text/event-stream"
        else:
            body, kind = orjson.dumps({"choices": choices}), b"application/json"
        headers = [(b"content-type", kind)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return upstream


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("shape", list(MALFORMED))
def test_a_malformed_answer_is_a_502_and_bills_nothing(live, shape, stream):
    before = live.balance_nano()
    with asgi_in_thread(answering(MALFORMED[shape], stream=stream), name="malformed") as url:
        Channel.objects.filter(name="primary").update(base_url=f"{url}/v1")
        routes_forget()
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
        response = live.post({**body, "max_tokens": 20, "stream": stream})
    assert response.status_code == 502
    assert_valid("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "upstream_error"
    (record,) = live.wait_settled()
    assert (record.end_reason, record.charged_nano) == (EndReason.UPSTREAM_ERROR, 0)
    assert live.balance_nano() == before


MESSAGE_START = {
    "type": "message_start",
    "message": {"type": "message", "usage": {"input_tokens": 9, "output_tokens": 1}},
}

# Anthropic-shaped: whole answers, and one event of a stream after its message_start.
MALFORMED_ANTHROPIC = {
    "content not a list": {"type": "message", "content": "oops"},
    "text not text": {"type": "message", "content": [{"type": "text", "text": 5}]},
    "a tool use without its id": {
        "type": "message",
        "content": [{"type": "tool_use", "name": "f", "input": {}}],
    },
    "a stop reason not text": {"type": "message", "content": [], "stop_reason": {"a": 1}},
}
MALFORMED_ANTHROPIC_EVENTS = {
    "text not text": {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": 5},
    },
    "arguments of a tool call never opened": {
        "type": "content_block_delta",
        "index": 7,
        "delta": {"type": "input_json_delta", "partial_json": "{"},
    },
    "a block not an object": {"type": "content_block_start", "index": 0, "content_block": "x"},
}


def answering_as_anthropic(answer: Any = None, *, event: Any = None):
    async def upstream(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if event is None:
            body, kind = orjson.dumps(answer), b"application/json"
        else:
            events = [MESSAGE_START, event, {"type": "message_stop"}]
            body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
            kind = b"text/event-stream"
        headers = [(b"content-type", kind)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return upstream


def claude_at(url: str) -> None:
    Channel.objects.filter(name="anthropic").update(base_url=f"{url}/v1")
    routes_forget()


CLAUDE_CALL = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("shape", list(MALFORMED_ANTHROPIC))
def test_a_malformed_anthropic_answer_is_a_502_and_bills_nothing(live, claude, shape):
    before = live.balance_nano()
    with asgi_in_thread(answering_as_anthropic(MALFORMED_ANTHROPIC[shape])) as url:
        claude_at(url)
        response = live.post({**CLAUDE_CALL, "max_tokens": 20})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    (record,) = live.wait_settled()
    assert (record.end_reason, record.charged_nano) == (EndReason.UPSTREAM_ERROR, 0)
    assert live.balance_nano() == before


@pytest.mark.parametrize("shape", list(MALFORMED_ANTHROPIC_EVENTS))
def test_a_malformed_anthropic_event_ends_the_stream_with_an_error(live, claude, shape):
    before = live.balance_nano()
    with asgi_in_thread(answering_as_anthropic(event=MALFORMED_ANTHROPIC_EVENTS[shape])) as url:
        claude_at(url)
        _response, events = live.stream({**CLAUDE_CALL, "max_tokens": 20, "stream": True})
    *_chunks, error = events
    assert_valid("ErrorResponse", error)
    assert error["error"]["code"] == "upstream_error"
    (record,) = live.wait_settled()
    assert (record.end_reason, record.charged_nano) == (EndReason.UPSTREAM_ERROR, 0)
    assert live.balance_nano() == before


def test_a_streamed_tool_call_numbered_out_of_turn_is_a_502(live):
    """A stream put together into a whole answer (a server that streams regardless) may
    not number a tool call past the next one: the calls would be padded up to it (a
    number in the billions would take the process's memory)."""
    choices = [{"message": {**MESSAGE, "tool_calls": [{"index": 5, "function": {}}]}}]
    with asgi_in_thread(answering(choices, stream=True), name="malformed") as url:
        Channel.objects.filter(name="primary").update(base_url=f"{url}/v1")
        routes_forget()
        response = live.post({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 502
    (record,) = live.wait_settled()
    assert (record.end_reason, record.charged_nano) == (EndReason.UPSTREAM_ERROR, 0)
