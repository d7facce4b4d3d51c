"""Streamed calls against a live real200: the SSE shape chunk by chunk, incremental
delivery, usage, and what is billed when the client or the upstream gives up halfway."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from apps.billing.models import Account
from apps.gateway.tokens import count_prompt_tokens, count_text_tokens
from apps.usage.models import EndReason, UsageSource
from tests.fakes import FakeUpstream, text_for
from tests.gateway.conftest import Live, cost_of, sse_events
from tests.gateway.test_completions import PARIS, WEATHER_TOOL
from tests.openapi import assert_valid
from tests.servers import asgi_in_thread, database_url_for_subprocess

pytestmark = pytest.mark.postgres

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


def streamed(model: str = "gpt-4o", *, include_usage: bool | None = None, **fields) -> dict:
    body = {"model": model, "messages": MESSAGES, "stream": True, "max_tokens": 200, **fields}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def chunks_of(events: list) -> list[dict]:
    """The chunks of a stream that ran to its end, each validated against OpenAI's schema."""
    assert events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    return chunks


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_stream_is_openai_shaped_chunk_by_chunk(live):
    live.upstream.configure(tokens=6, prompt_tokens=15, cached_tokens=3)
    before = live.balance_nano()
    with live.sdk.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=200
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        raw = "".join(f"{line}\n" for line in response.iter_lines())
    chunks = chunks_of(sse_events(raw))
    assert {chunk["id"] for chunk in chunks} == {request_id}
    assert {chunk["model"] for chunk in chunks} == {"gpt-4o"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == text_for(6)
    last = chunks[-1]["choices"][0]
    assert last["delta"] == {}
    assert last["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in chunk for chunk in chunks)  # not asked for, not sent
    # ...but real200 asked the upstream for it, to bill by.
    assert live.upstream.calls[-1].body["stream_options"] == {"include_usage": True}
    (record,) = live.wait_settled()
    assert record.request_id == request_id
    assert record.is_stream
    assert record.usage_source == UsageSource.UPSTREAM
    assert record.end_reason == EndReason.DONE
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (15, 3, 6)
    assert record.charged_nano == cost_of(record) == 12 * 2_500 + 3 * 1_250 + 6 * 10_000
    assert live.balance_nano() == before - record.charged_nano
    assert live.held_nano() == 0


def test_with_include_usage_one_more_chunk_carries_the_usage(live):
    live.upstream.configure(tokens=4, prompt_tokens=12, cached_tokens=2)
    json_mode = {"type": "json_object"}
    body = streamed(include_usage=True, stop="END", seed=7, response_format=json_mode)
    response, events = live.stream(body)
    chunks = chunks_of(events)
    *answer, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 4,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert usage_chunk["id"] == response.headers["x-request-id"]
    assert all(chunk["usage"] is None for chunk in answer)
    assert answer[-1]["choices"][0]["finish_reason"] == "stop"
    sent = live.upstream.calls[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    assert (sent["stop"], sent["seed"], sent["response_format"]) == ("END", 7, json_mode)
    (record,) = live.wait_settled()
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (12, 2, 4)


def test_the_sdk_reads_a_stream_and_its_usage(live):
    live.upstream.configure(tokens=5)
    stream = live.sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_for(5)
    assert chunks[-1].usage.completion_tokens == 5
    assert live.upstream.calls[-1].body["max_tokens"] == 4096


def test_a_stream_reaches_the_client_while_the_upstream_is_still_writing(live):
    pace, tokens = 0.1, 6
    live.upstream.configure(tokens=tokens, pace=pace)
    started = time.monotonic()
    first_text_at = produced_then = None
    headers = {"Authorization": f"Bearer {live.key}"}
    url = f"{live.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=streamed(), headers=headers, timeout=30) as response:
        for line in response.iter_lines():
            if first_text_at is None and '"content":"The"' in line:
                first_text_at = time.monotonic()
                call = live.upstream.calls[-1]
                produced_then, finished_then = call.tokens_sent, call.completed
    ended_at = time.monotonic()
    assert first_text_at is not None
    # The first word arrived while the upstream had produced at most two of six and was
    # still holding the rest back...
    assert produced_then <= 2
    assert not finished_then
    # ...and well before the answer could have been complete.
    assert first_text_at - started < (tokens - 2) * pace
    assert ended_at - first_text_at >= (tokens - 2) * pace
    assert live.upstream.calls[-1].completed


def test_a_streamed_tool_call_arrives_in_fragments(live):
    live.upstream.configure(tokens=0, tool_call=PARIS)
    before = live.balance_nano()
    _response, events = live.stream(streamed(tools=[WEATHER_TOOL], tool_choice="auto"))
    chunks = chunks_of(events)
    fragments = [
        call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    ]
    assert fragments[0]["id"]
    assert fragments[0]["function"]["name"] == "get_weather"
    arguments = "".join(f["function"].get("arguments", "") for f in fragments)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert len(fragments) > 2  # passed on as they came, not merged
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert live.upstream.calls[-1].body["tools"] == [WEATHER_TOOL]
    (record,) = live.wait_settled()
    assert record.completion_tokens > 0
    assert live.balance_nano() == before - cost_of(record)


@pytest.mark.parametrize("stream", [True, False])
def test_a_tool_call_without_usage_is_billed_for_its_name_and_arguments(live, stream):
    """real200's own count of a tool call is the same streamed or not."""
    live.upstream.configure(tokens=0, tool_call=PARIS, usage=False)
    response = live.post(streamed(tools=[WEATHER_TOOL], stream=stream))
    assert response.status_code == 200
    (record,) = live.wait_settled()
    arguments = orjson.dumps(PARIS["arguments"]).decode()
    assert record.completion_tokens == count_text_tokens(PARIS["name"] + arguments, "gpt-4o")


def test_the_sdk_assembles_a_streamed_tool_call(live):
    live.upstream.configure(tokens=0, tool_call=PARIS)
    stream = live.sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    )
    arguments = ""
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or ():
            arguments += call.function.arguments or ""
    assert orjson.loads(arguments) == {"city": "Paris"}


def test_a_usage_frame_sent_several_times_is_counted_once(live):
    live.upstream.configure(tokens=5, prompt_tokens=10, usage_repeats=3)
    before = live.balance_nano()
    _response, events = live.stream(streamed(include_usage=True))
    chunks = chunks_of(events)
    usage_chunks = [chunk for chunk in chunks if chunk.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["usage"]["completion_tokens"] == 5
    (record,) = live.wait_settled()
    assert (record.prompt_tokens, record.completion_tokens) == (10, 5)
    assert record.charged_nano == 10 * 2_500 + 5 * 10_000
    assert live.balance_nano() == before - record.charged_nano
    assert live.ledger_size() == 2  # the funding and this one charge


def test_a_stream_whose_upstream_reports_no_usage_is_billed_by_our_own_count(live):
    live.upstream.configure(tokens=12, usage=False)
    before = live.balance_nano()
    _response, events = live.stream(streamed(include_usage=True))
    chunks = chunks_of(events)
    prompt = count_prompt_tokens(MESSAGES, "gpt-4o")
    completion = count_text_tokens(text_for(12), "gpt-4o")
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt
    assert chunks[-1]["usage"]["completion_tokens"] == completion
    (record,) = live.wait_settled()
    assert record.usage_source == UsageSource.ESTIMATED
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, completion)
    assert record.charged_nano == cost_of(record) > 0
    assert live.balance_nano() == before - record.charged_nano


def test_an_upstream_that_ignores_stream_has_its_whole_answer_relayed_as_a_stream(live):
    """Some compatible servers answer `stream: true` with the whole completion, as JSON.
    They bill it, so the customer gets it, as a stream, billed on the upstream's usage."""
    live.upstream.configure(tokens=6, prompt_tokens=15, cached_tokens=3, ignores_stream=True)
    before = live.balance_nano()
    response, events = live.stream(streamed(include_usage=True))
    *answer, usage_chunk = chunks_of(events)
    assert {chunk["id"] for chunk in answer} == {response.headers["x-request-id"]}
    assert {chunk["model"] for chunk in answer} == {"gpt-4o"}
    assert answer[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(answer) == text_for(6)
    assert answer[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert live.upstream.calls[-1].body["stream"] is True
    assert usage_chunk["usage"]["completion_tokens"] == 6
    (record,) = live.wait_settled()
    assert record.usage_source == UsageSource.UPSTREAM
    assert record.end_reason == EndReason.DONE
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (15, 3, 6)
    assert live.balance_nano() == before - record.charged_nano == before - cost_of(record)


def test_the_sdk_reads_a_tool_call_from_an_upstream_that_ignores_stream(live):
    live.upstream.configure(tokens=0, tool_call=PARIS, ignores_stream=True)
    stream = live.sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    )
    chunks = list(stream)
    (call,) = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
    assert (call.index, call.function.name) == (0, "get_weather")
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    (record,) = live.wait_settled()
    assert record.completion_tokens > 0


def test_an_anthropic_stream_is_openai_shaped_and_bills_its_cache_tokens(live, claude):
    claude.configure(tokens=7, prompt_tokens=10, cached_tokens=4, cache_creation_tokens=6)
    before = live.balance_nano()
    response, events = live.stream(streamed("claude-sonnet-4", include_usage=True))
    chunks = chunks_of(events)
    assert {chunk["id"] for chunk in chunks} == {response.headers["x-request-id"]}
    assert {chunk["model"] for chunk in chunks} == {"claude-sonnet-4"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == text_for(7)
    *answer, usage_chunk = chunks
    assert answer[-1]["choices"][0]["delta"] == {}
    assert answer[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["usage"]["prompt_tokens"] == 20
    assert usage_chunk["usage"]["completion_tokens"] == 7  # the last running total, not a sum
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert claude.calls[-1].body["stream"] is True
    (record,) = live.wait_settled()
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (20, 4, 7)
    assert record.cache_write_tokens == 6
    assert record.charged_nano == cost_of(record) == 10 * 3_000 + 4 * 300 + 6 * 3_750 + 7 * 15_000
    assert live.balance_nano() == before - record.charged_nano


def test_an_anthropic_stream_with_repeated_usage_is_counted_once(live, claude):
    claude.configure(tokens=5, prompt_tokens=10, usage_repeats=3)
    _response, events = live.stream(streamed("claude-sonnet-4", include_usage=True))
    assert chunks_of(events)[-1]["usage"]["completion_tokens"] == 5
    (record,) = live.wait_settled()
    assert (record.prompt_tokens, record.completion_tokens) == (10, 5)


def test_a_streamed_anthropic_tool_call_arrives_in_fragments(live, claude):
    claude.configure(tokens=0, tool_call=PARIS)
    _response, events = live.stream(streamed("claude-sonnet-4", tools=[WEATHER_TOOL]))
    chunks = chunks_of(events)
    fragments = [
        call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    ]
    assert fragments[0]["function"]["name"] == "get_weather"
    arguments = "".join(f["function"].get("arguments", "") for f in fragments)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --- Ends that are not the answer's end -------------------------------------------------


def tokens(text_tokens: int) -> int:
    """Tokens of the fake's first `text_tokens` words, as real200 counts them."""
    return count_text_tokens(text_for(max(text_tokens, 0)), "gpt-4o")


def leave_after(live: Live, *, words: int, field: str = "content", **body) -> tuple[str, float]:
    """Stream a call and read the deltas' `field` until `words` words have come, then
    leave (the connection closes). Returns the text received and when the client left."""
    headers = {"Authorization": f"Bearer {live.key}"}
    url = f"{live.url}/v1/chat/completions"
    received = ""
    with httpx.stream("POST", url, json=streamed(**body), headers=headers, timeout=30) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                received += orjson.loads(line[6:])["choices"][0]["delta"].get(field) or ""
            if len(received.split()) >= words:
                break
        return received, time.monotonic()


def test_a_client_that_disconnects_is_billed_for_what_was_produced(live):
    live.upstream.configure(tokens=400, pace=0.02)
    before = live.balance_nano()
    received, left_at = leave_after(live, words=5, max_tokens=1000)
    call = live.upstream.calls[-1]
    assert call.wait_disconnected(seconds=2), "real200 kept reading from the upstream"
    assert call.disconnected_at - left_at < 0.5  # at once, not at the next chunk timeout
    assert not call.completed
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.CLIENT_GONE
    assert record.usage_source == UsageSource.ESTIMATED
    assert record.prompt_tokens == count_prompt_tokens(MESSAGES, "gpt-4o")
    # Billed what the upstream produced until the client left: at least what the client
    # received, at most what was produced, short of it by no more than two tokens in flight.
    produced = call.tokens_at_disconnect
    assert produced < 400
    assert count_text_tokens(received, "gpt-4o") <= record.completion_tokens
    assert tokens(produced - 2) <= record.completion_tokens <= tokens(call.tokens_sent)
    assert record.charged_nano == cost_of(record)
    assert live.balance_nano() == before - record.charged_nano
    assert live.held_nano() == 0


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_the_reasoning_a_model_shows_is_relayed_and_billed_as_output(live, field):
    """DeepSeek's R1 and Qwen's QwQ stream their reasoning (`reasoning_content`;
    `reasoning` on OpenRouter) before the answer, and bill it as output: with no usage
    from the upstream, real200's own count includes it."""
    live.upstream.configure(tokens=5, reasoning_tokens=30, reasoning_field=field, usage=False)
    before = live.balance_nano()
    _response, events = live.stream(streamed())
    chunks = chunks_of(events)
    shown = "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])
    assert shown == text_for(30)
    assert text_of(chunks) == text_for(5)
    (record,) = live.wait_settled()
    assert record.usage_source == UsageSource.ESTIMATED
    assert record.completion_tokens == count_text_tokens(text_for(30) + text_for(5), "gpt-4o")
    assert live.balance_nano() == before - record.charged_nano == before - cost_of(record)


def test_a_client_that_leaves_during_the_reasoning_pays_for_the_reasoning_produced(live):
    live.upstream.configure(tokens=5, reasoning_tokens=400, pace=0.02)
    shown, _left_at = leave_after(live, words=10, field="reasoning_content")
    call = live.upstream.calls[-1]
    assert call.wait_disconnected(seconds=2)
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.CLIENT_GONE
    assert count_text_tokens(shown, "gpt-4o") <= record.completion_tokens
    assert tokens(call.tokens_at_disconnect - 2) <= record.completion_tokens
    assert record.completion_tokens <= tokens(call.tokens_sent)


def test_a_bug_mid_stream_ends_the_stream_with_an_error_and_bills_what_was_delivered(
    live, monkeypatch
):
    """An error of real200's own while relaying (injected here) is logged, ends the
    stream with an error event instead of a cut connection, and the call is settled."""
    from apps.gateway.providers import openai

    counted = openai._generated_text
    chunks_seen = 0

    def breaks_at_the_fourth_chunk(choices):
        nonlocal chunks_seen
        chunks_seen += 1
        if chunks_seen == 4:
            raise RuntimeError("injected")
        return counted(choices)

    monkeypatch.setattr(openai, "_generated_text", breaks_at_the_fourth_chunk)
    live.upstream.configure(tokens=10)
    before = live.balance_nano()
    _response, events = live.stream(streamed())
    chunks, error = failed_stream(events)
    assert error["type"] == "api_error"
    assert "request id" in error["message"]
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.UPSTREAM_ERROR
    assert record.completion_tokens == count_text_tokens(text_of(chunks), "gpt-4o") > 0
    assert live.balance_nano() == before - record.charged_nano
    assert live.held_nano() == 0


def failed_stream(events: list) -> tuple[list[dict], dict]:
    """The chunks before the failure (validated) and the one error event that ends it."""
    *chunks, error = events
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert_valid("ErrorResponse", error)
    assert "[DONE]" not in events
    return chunks, error["error"]


def test_a_stall_after_the_upstream_accepted_ends_the_stream_without_a_retry(live, backup):
    live.set_timeouts(0.3)
    live.upstream.configure(tokens=8, stall_after=3, stall=3.0)
    before = live.balance_nano()
    response, events = live.stream(streamed(include_usage=True))
    assert response.status_code == 200
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_timeout"
    assert error["type"] == "api_error"
    assert text_of(chunks) == text_for(3)
    assert len(live.upstream.calls) == 1
    assert backup.calls == []
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.TIMEOUT
    assert record.prompt_tokens == count_prompt_tokens(MESSAGES, "gpt-4o")
    assert record.completion_tokens == tokens(3)
    assert record.charged_nano == cost_of(record)
    assert live.balance_nano() == before - record.charged_nano
    assert live.upstream.calls[-1].wait_disconnected(seconds=2)


def test_an_upstream_error_mid_stream_ends_the_stream_and_bills_only_what_was_delivered(
    live, backup
):
    live.upstream.configure(tokens=8, error_after=4)
    before = live.balance_nano()
    _response, events = live.stream(streamed(include_usage=True))
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_error"
    assert "fake failure" not in error["message"]  # the upstream's own words stay inside
    assert text_of(chunks) == text_for(4)
    assert all(chunk["choices"] for chunk in chunks)  # no usage chunk after a failure
    assert len(live.upstream.calls) == 1
    assert backup.calls == []
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.UPSTREAM_ERROR
    # The error event's text is never output.
    assert record.completion_tokens == tokens(4)
    assert record.charged_nano == cost_of(record)
    assert live.balance_nano() == before - record.charged_nano


def test_a_connection_dropped_mid_stream_ends_the_stream_and_bills_what_was_delivered(live, backup):
    live.upstream.configure(tokens=8, drop_after=3)
    before = live.balance_nano()
    _response, events = live.stream(streamed())
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_error"
    assert text_of(chunks) == text_for(3)
    assert backup.calls == []
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.UPSTREAM_ERROR
    assert record.completion_tokens == tokens(3)
    assert live.balance_nano() == before - record.charged_nano


def test_an_upstream_error_before_any_text_bills_nothing(live, backup):
    live.upstream.configure(tokens=8, error_after=0)
    before = live.balance_nano()
    _response, events = live.stream(streamed())
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_error"
    assert text_of(chunks) == ""
    assert backup.calls == []  # the role chunk was sent: too late for another channel
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.UPSTREAM_ERROR
    assert (record.completion_tokens, record.charged_nano) == (0, 0)
    assert live.balance_nano() == before


def test_an_anthropic_error_mid_stream_bills_only_what_was_delivered(live, claude):
    claude.configure(tokens=8, error_after=3, prompt_tokens=30, cache_creation_tokens=12)
    before = live.balance_nano()
    _response, events = live.stream(streamed("claude-sonnet-4"))
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_error"
    assert text_of(chunks) == text_for(3)
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.UPSTREAM_ERROR
    # Anthropic's own count, sent before the failure: the cache writes are made by then.
    assert (record.prompt_tokens, record.cache_write_tokens) == (42, 12)
    assert record.completion_tokens == tokens(3)
    assert live.balance_nano() == before - cost_of(record)


def test_a_stream_past_the_longest_call_time_ends_with_a_timeout_event(live, settings):
    settings.GATEWAY_MAX_CALL_SECONDS = 0.3
    live.upstream.configure(tokens=100, pace=0.03)
    before = live.balance_nano()
    _response, events = live.stream(streamed())
    chunks, error = failed_stream(events)
    assert error["code"] == "upstream_timeout"
    delivered = text_of(chunks)
    assert 0 < len(delivered.split()) < 100
    assert live.upstream.calls[-1].wait_disconnected(seconds=2)
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.TIMEOUT
    assert record.completion_tokens == count_text_tokens(delivered, "gpt-4o")
    assert live.balance_nano() == before - cost_of(record)


def test_a_client_that_leaves_before_the_first_chunk_pays_nothing(live):
    live.upstream.configure(header_delay=3.0)
    before = live.balance_nano()
    with pytest.raises(httpx.ReadTimeout):
        live.stream(streamed(), timeout=0.5)
    call = live.upstream.calls[-1]
    assert call.wait_disconnected(seconds=1), "real200 kept waiting for the upstream"
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.CLIENT_GONE
    assert record.charged_nano == 0
    assert live.balance_nano() == before


def test_a_client_that_leaves_while_its_hold_is_placed_gets_the_money_back_at_once(
    live, monkeypatch
):
    """A hold, once asked for, is placed whether or not its client stays: what it held is
    released as soon as it is placed, not when the hold would expire."""
    from apps.billing.models import Hold, HoldStatus
    from apps.gateway import calls

    assert live.post(streamed(stream=False)).status_code == 200  # warm: vocabulary, route
    place = calls._hold_start

    def slow_hold(*args, **kwargs):
        time.sleep(0.6)  # the database is slow today: the client gives up first
        return place(*args, **kwargs)

    monkeypatch.setattr(calls, "_hold_start", slow_hold)
    before = live.balance_nano()
    with pytest.raises(httpx.ReadTimeout):
        live.stream(streamed(), timeout=0.3)
    deadline = time.monotonic() + 5
    while not Hold.objects.filter(status=HoldStatus.RELEASED).exists():
        assert time.monotonic() < deadline, "the abandoned hold was never released"
        time.sleep(0.05)
    assert live.held_nano() == 0
    assert live.balance_nano() == before
    assert len(live.upstream.calls) == 1  # the warm-up's: nothing more went upstream
    assert len(live.records()) == 1


def stream_and_lock_the_books(live: Live, url: str, books: psycopg.Connection) -> list[str]:
    """Stream a call to `url`; once its first chunk is in (its hold placed), lock the
    organization's account row in the transaction of `books`, so that the call's
    settlement waits until that transaction ends; read the rest of the stream. Returns the
    lines read after the first chunk."""
    live.upstream.configure(tokens=3, pace=0.1)
    lock = sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
        sql.Identifier(Account._meta.db_table)
    )
    headers = {"Authorization": f"Bearer {live.key}"}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=streamed(), headers=headers, timeout=30
    ) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        books.execute(lock, [live.account().pk])
        return [line for line in lines if line]


def test_a_stream_ends_for_its_client_before_the_books_are_written(live):
    """The settlement of a stream that ran to its end is written after the last byte: a
    client does not wait for a round trip to the books (several under load)."""
    with psycopg.connect(database_url_for_subprocess()) as books:
        rest = stream_and_lock_the_books(live, live.url, books)
        assert rest[-1] == "data: [DONE]"
        time.sleep(0.2)
        assert live.records() == []  # waiting for the account row
        assert live.held_nano() > 0
        books.rollback()
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.DONE
    assert record.completion_tokens == tokens(3)


def test_a_server_that_stops_settles_its_ended_streams_first(live):
    from config.asgi import application

    with psycopg.connect(database_url_for_subprocess()) as books:
        with asgi_in_thread(application, name="real200-stopping") as url:
            rest = stream_and_lock_the_books(live, url, books)
            assert rest[-1] == "data: [DONE]"
            threading.Timer(0.5, books.rollback).start()
            stopping = time.monotonic()
        # Leaving `asgi_in_thread` stopped the server, which waited for the settlement.
        assert time.monotonic() - stopping >= 0.4
    (record,) = live.records()
    assert record.end_reason == EndReason.DONE
    assert live.held_nano() == 0


class RecordedSends:
    """real200's ASGI application, with the messages it sends for each response kept."""

    def __init__(self, application) -> None:
        self.application = application
        self.messages: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        async def recording_send(message) -> None:
            self.messages.append(message)
            await send(message)

        await self.application(scope, receive, recording_send)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_ends_its_body_with_its_last_event(live, include_usage):
    """The last event goes out as the end of the body: one write with HTTP's end marker,
    not one for the event and another, empty, after it."""
    from config.asgi import application

    live.upstream.configure(tokens=3)
    recorded = RecordedSends(application)
    with asgi_in_thread(recorded) as url:
        _response, events = replace(live, url=url).stream(streamed(include_usage=include_usage))
    assert events[-1] == "[DONE]"
    bodies = [m for m in recorded.messages if m["type"] == "http.response.body"]
    *parts, last = bodies
    assert all(part["more_body"] for part in parts)
    assert last["more_body"] is False
    assert last["body"].endswith(b"data: [DONE]\n\n")
    assert last["body"].count(b'"usage":{') == include_usage
    live.wait_settled()


class WritesThatWait:
    """real200's ASGI application behind a server whose writes to the client wait, as
    uvicorn's do when a client stops reading and the socket's buffers are full (its flow
    control): `before_headers` seconds before the response's headers go out, or
    `before_second_part` seconds before the second part of its body."""

    def __init__(self, application, *, before_headers: float = 0, before_second_part: float = 0):
        self.application = application
        self.before_headers = before_headers
        self.before_second_part = before_second_part

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.application(scope, receive, send)
        parts = 0

        async def waiting_send(message) -> None:
            nonlocal parts
            if message["type"] == "http.response.start":
                await asyncio.sleep(self.before_headers)
            elif message.get("body"):
                parts += 1
                if parts == 2:
                    await asyncio.sleep(self.before_second_part)
            await send(message)

        await self.application(scope, receive, waiting_send)


def cut_short_behind_waiting_writes(
    live: Live,
    upstream: FakeUpstream,
    error: type[Exception],
    *,
    pace: float,
    model: str = "gpt-4o",
    timeout: float = 0.5,
    **waits: float,
):
    """Stream a long answer (400 tokens, one every `pace` s) through real200 behind
    `WritesThatWait(**waits)` until the client gets `error`. Returns the balance before
    the call, the upstream's call once real200 has left it, and the call's usage record."""
    from config.asgi import application

    assert live.post(streamed(model, stream=False)).status_code == 200  # warm: vocabulary, route
    upstream.configure(tokens=400, pace=pace)
    before = live.balance_nano()
    with asgi_in_thread(WritesThatWait(application, **waits)) as url:
        with pytest.raises(error):
            replace(live, url=url).stream(streamed(model, max_tokens=1000), timeout=timeout)
        _warm_up, call = upstream.wait_for_calls(2)
        assert call.wait_disconnected(seconds=1), "real200 kept reading from the upstream"
        _warm_up, record = live.wait_settled(2)
    return before, call, record


def assert_billed_what_was_produced(call, record, model: str = "gpt-4o") -> None:
    """Billed for what the upstream produced until real200 left it, short of it by no more
    than two tokens in flight."""
    produced = call.tokens_at_disconnect
    assert 10 < produced < 400
    bounds = [count_text_tokens(text_for(n), model) for n in (produced - 2, produced)]
    assert bounds[0] <= record.completion_tokens <= bounds[1]


def test_a_client_that_leaves_while_its_headers_wait_to_be_written_is_billed(live):
    """The stream is open upstream (the hold placed, the first chunk in) when the client
    leaves while the response's headers are still waiting to be written: the body was never
    iterated, and it must still close the upstream and settle the call, billed for what
    the upstream produced meanwhile."""
    before, call, record = cut_short_behind_waiting_writes(
        live, live.upstream, httpx.ReadTimeout, pace=0.02, before_headers=3.0
    )
    assert record.end_reason == EndReason.CLIENT_GONE
    assert record.prompt_tokens == count_prompt_tokens(MESSAGES, "gpt-4o")
    assert_billed_what_was_produced(call, record)
    assert live.balance_nano() == before - cost_of(record)
    assert live.held_nano() == 0


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4"])
def test_a_client_that_leaves_while_a_write_waits_is_billed_as_gone(live, request, model):
    """The client leaves while the server waits to write a part of the body (the response
    task is cancelled in the server's send, outside the relay): the call is still one whose
    client went away, not a completed answer, and it is billed for what the upstream
    produced until real200 closed it, which includes what waited in real200's buffers
    while the relay could not write (it reads the upstream no faster than it writes)."""
    upstream = request.getfixturevalue("claude") if model.startswith("claude") else live.upstream
    before, call, record = cut_short_behind_waiting_writes(
        live, upstream, httpx.ReadTimeout, pace=0.02, model=model, before_second_part=3.0
    )
    assert record.end_reason == EndReason.CLIENT_GONE
    assert record.usage_source == UsageSource.ESTIMATED
    assert_billed_what_was_produced(call, record, model)
    assert live.balance_nano() == before - cost_of(record)
    assert live.held_nano() == 0


def test_a_client_slower_than_the_chunk_timeout_does_not_fail_a_live_upstream(live):
    """The between-chunks timeout is the upstream's silence. A relay waiting to write to a
    client that reads slowly reads nothing meanwhile, and that is not the upstream's
    silence: the answer arrives whole, billed as done."""
    from config.asgi import application

    assert live.post(streamed(stream=False)).status_code == 200  # warm: vocabulary, route
    live.set_timeouts(0.3)
    live.upstream.configure(tokens=20, pace=0.01)
    with asgi_in_thread(WritesThatWait(application, before_second_part=1.0)) as url:
        response, events = replace(live, url=url).stream(streamed())
        _warm_up, record = live.wait_settled(2)
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    assert text_of(chunks_of(events)) == text_for(20)
    assert record.end_reason == EndReason.DONE


def test_a_stream_whose_client_stopped_reading_still_ends_at_the_longest_call_time(
    live, settings, monkeypatch
):
    """A client that stops reading but keeps its connection holds the relay in a write,
    where it sees no upstream event and so not the call's deadline either. Left alone, the
    call's hold would expire unbilled, and the client could read the answer afterwards for
    free. The handler ends such a stream soon after the call's time: settled as a timeout,
    billed for what the upstream produced."""
    import config.asgi

    monkeypatch.setattr(config.asgi, "OVERDUE_GRACE_SECONDS", 0.2)
    settings.GATEWAY_MAX_CALL_SECONDS = 0.5
    started = time.monotonic()
    before, call, record = cut_short_behind_waiting_writes(
        live,
        live.upstream,
        httpx.RemoteProtocolError,  # the body cut short
        pace=0.01,
        timeout=10,
        before_second_part=30.0,
    )
    assert time.monotonic() - started < 4
    assert record.end_reason == EndReason.TIMEOUT
    assert_billed_what_was_produced(call, record)
    assert live.balance_nano() == before - cost_of(record)
    assert live.held_nano() == 0
