"""The OpenAI-compatible adapter against a real HTTP stand-in for the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from apps.gateway.providers.base import (
    ChatRequest,
    ChunkEvent,
    StreamEvent,
    Upstream,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnavailable,
    Usage,
    UsageEvent,
    output_text,
)
from apps.gateway.providers.openai import OpenAIProvider
from tests.fakes import OpenAIFake, text_for

provider = OpenAIProvider()
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIFake]:
    with OpenAIFake() as fake:
        yield fake


@pytest.fixture
def fake(server: OpenAIFake) -> OpenAIFake:
    server.reset()
    return server


def upstream_for(fake: OpenAIFake, **options: Any) -> Upstream:
    return Upstream(base_url=fake.base_url, api_key="sk-upstream", model="up-model", **options)


def chat(max_tokens: int = 100, **body: Any) -> ChatRequest:
    return ChatRequest(
        body={"model": "gpt-4o", "messages": MESSAGES, **body}, max_tokens=max_tokens
    )


async def collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in events]


async def read_into(received: list[StreamEvent], events: AsyncIterator[StreamEvent]) -> None:
    """Read a stream that will fail, keeping what arrived before the failure."""
    async for event in events:
        received.append(event)


def chunks(events: list[StreamEvent]) -> list[ChunkEvent]:
    return [event for event in events if isinstance(event, ChunkEvent)]


def usages(events: list[StreamEvent]) -> list[Usage]:
    return [event.usage for event in events if isinstance(event, UsageEvent)]


# --- the request ------------------------------------------------------------------------


async def test_body_is_passed_through_with_the_upstream_model_key_and_cap(fake, client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = chat(max_tokens=42, temperature=0.3, tools=tools, seed=7, user="u-1")

    await provider.complete(request, upstream_for(fake), client)

    call = fake.calls[-1]
    assert call.path == "/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer sk-upstream"
    assert call.body == {
        "model": "up-model",
        "messages": MESSAGES,
        "temperature": 0.3,
        "tools": tools,
        "seed": 7,
        "user": "u-1",
        "max_tokens": 42,
    }


async def test_the_cap_keeps_the_name_the_customer_used(fake, client) -> None:
    await provider.complete(
        chat(max_tokens=9, max_completion_tokens=500), upstream_for(fake), client
    )

    body = fake.calls[-1].body
    assert body["max_completion_tokens"] == 9
    assert "max_tokens" not in body


async def test_a_channel_can_name_the_cap_for_reasoning_models(fake, client) -> None:
    upstream = upstream_for(fake, settings={"max_tokens_param": "max_completion_tokens"})

    await provider.complete(chat(max_tokens=9), upstream, client)

    body = fake.calls[-1].body
    assert body["max_completion_tokens"] == 9
    assert "max_tokens" not in body


async def test_a_stream_asks_for_usage_keeping_the_customers_stream_options(fake, client) -> None:
    request = chat(stream=True, stream_options={"include_obfuscation": False})

    await collect(provider.stream(request, upstream_for(fake), client))

    body = fake.calls[-1].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


async def test_a_stream_sends_no_stream_options_where_the_upstream_refuses_them(
    fake, client
) -> None:
    request = chat(stream=True, stream_options={"include_usage": True})

    await collect(provider.stream(request, upstream_for(fake, supports_stream_usage=False), client))

    assert "stream_options" not in fake.calls[-1].body


async def test_a_whole_answer_sends_no_stream_fields(fake, client) -> None:
    await provider.complete(
        chat(stream_options={"include_usage": True}), upstream_for(fake), client
    )

    assert "stream" not in fake.calls[-1].body
    assert "stream_options" not in fake.calls[-1].body


# --- whole answers ----------------------------------------------------------------------


async def test_a_whole_answer_keeps_choices_fingerprint_and_cached_usage(fake, client) -> None:
    fake.configure(tokens=6, prompt_tokens=50, cached_tokens=32)

    completion = await provider.complete(chat(), upstream_for(fake), client)

    choice = completion.response["choices"][0]
    assert choice["message"]["content"] == text_for(6)
    assert choice["finish_reason"] == "stop"
    assert completion.response["system_fingerprint"] == "fp_fake"
    assert completion.usage == Usage(prompt_tokens=50, completion_tokens=6, cached_tokens=32)


@pytest.mark.parametrize(
    "field", ["prompt_tokens_details", "prompt_cache_hit_tokens", "cached_tokens"]
)
async def test_cache_reads_are_found_where_each_server_reports_them(fake, client, field) -> None:
    fake.configure(tokens=3, prompt_tokens=40, cached_tokens=24, cached_field=field)

    completion = await provider.complete(chat(), upstream_for(fake), client)
    *_chunks, usage = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    expected = Usage(prompt_tokens=40, completion_tokens=3, cached_tokens=24)
    assert completion.usage == expected
    assert usage == UsageEvent(expected)


async def test_a_whole_answer_without_usage_says_so(fake, client) -> None:
    fake.configure(usage=False)

    completion = await provider.complete(chat(), upstream_for(fake), client)

    assert completion.usage is None


async def test_a_whole_tool_call_comes_back_as_sent(fake, client) -> None:
    fake.configure(tokens=0, tool_call={"name": "get_weather", "arguments": {"city": "Paris"}})

    completion = await provider.complete(chat(), upstream_for(fake), client)

    choice = completion.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }


async def test_a_channel_of_stream_only_models_is_streamed_and_put_together(fake, client) -> None:
    fake.configure(tokens=6, prompt_tokens=50, cached_tokens=32)
    upstream = upstream_for(fake, settings={"stream_only": True})

    completion = await provider.complete(chat(), upstream, client)

    body = fake.calls[-1].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert completion.response == {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text_for(6)},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "system_fingerprint": "fp_fake",
    }
    assert completion.usage == Usage(prompt_tokens=50, completion_tokens=6, cached_tokens=32)


async def test_a_stream_only_tool_call_is_put_together_from_its_fragments(fake, client) -> None:
    arguments = {"city": "Paris", "unit": "celsius", "days": 3}
    fake.configure(tokens=2, tool_call={"name": "get_weather", "arguments": arguments})
    upstream = upstream_for(fake, settings={"stream_only": True})

    completion = await provider.complete(chat(), upstream, client)

    assert fake.calls[-1].body["stream"] is True
    choice = completion.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == text_for(2)
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == f"call_fake{len(fake.calls)}"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == arguments


async def test_a_server_that_streams_an_answer_not_asked_as_a_stream_has_it_put_together(
    fake, client
) -> None:
    fake.configure(tokens=5, always_streams=True)

    completion = await provider.complete(chat(), upstream_for(fake), client)

    assert "stream" not in fake.calls[-1].body
    assert completion.response["choices"][0]["message"]["content"] == text_for(5)
    assert completion.response["choices"][0]["finish_reason"] == "stop"
    assert completion.usage is None  # not asked for: real200 counts it itself


async def test_a_stream_only_answer_cut_short_fails_as_a_stream_does(fake, client) -> None:
    fake.configure(tokens=8, drop_after=3)
    upstream = upstream_for(fake, settings={"stream_only": True})

    with pytest.raises(UpstreamFailed):
        await provider.complete(chat(), upstream, client)


async def test_a_server_that_answers_a_stream_with_json_has_it_streamed(fake, client) -> None:
    fake.configure(tokens=3, prompt_tokens=20, ignores_stream=True)

    events = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    *chunks, usage = events
    assert [e.choices[0]["delta"].get("content") for e in chunks] == [text_for(3), None]
    assert chunks[-1].choices[0]["finish_reason"] == "stop"
    assert usage == UsageEvent(Usage(prompt_tokens=20, completion_tokens=3))


def test_reasoning_sent_under_both_names_is_counted_once() -> None:
    both = {"content": "Hi", "reasoning_content": "think", "reasoning": "think"}
    assert output_text(both) == "Hithink"
    assert output_text({"reasoning": "r", "content": None, "refusal": "no"}) == "nor"
    assert output_text({"content": [{"type": "text"}]}) == ""  # not text: nothing counted


# --- streams ----------------------------------------------------------------------------


async def test_a_stream_yields_each_chunk_then_the_usage(fake, client) -> None:
    fake.configure(tokens=4, prompt_tokens=20, cached_tokens=8)

    events = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    text = "".join(event.text for event in chunks(events))
    assert text == text_for(4)
    assert chunks(events)[0].choices[0]["delta"]["role"] == "assistant"
    assert chunks(events)[-1].choices[0]["finish_reason"] == "stop"
    assert chunks(events)[-1].system_fingerprint == "fp_fake"
    assert isinstance(events[-1], UsageEvent)
    assert usages(events) == [Usage(prompt_tokens=20, completion_tokens=4, cached_tokens=8)]


async def test_a_stream_is_passed_on_while_the_upstream_is_still_writing(fake, client) -> None:
    fake.configure(tokens=5, pace=0.3)
    started = time.monotonic()

    async for event in provider.stream(chat(stream=True), upstream_for(fake), client):
        if isinstance(event, ChunkEvent) and event.text:
            break

    assert time.monotonic() - started < 1.0  # the whole answer takes 1.5 s
    call = fake.calls[-1]
    assert not call.completed
    assert call.tokens_sent < 5


async def test_a_usage_frame_sent_again_repeats_the_total(fake, client) -> None:
    fake.configure(tokens=3, usage_repeats=3)

    events = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    assert usages(events) == [Usage(prompt_tokens=10, completion_tokens=3)] * 3


async def test_a_stream_without_usage_yields_no_usage(fake, client) -> None:
    fake.configure(usage=False)

    events = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    assert usages(events) == []
    assert chunks(events)[-1].choices[0]["finish_reason"] == "stop"


async def test_tool_call_fragments_count_as_generated_text(fake, client) -> None:
    fake.configure(tokens=0, tool_call={"name": "lookup", "arguments": {"query": "real200 docs"}})

    events = await collect(provider.stream(chat(stream=True), upstream_for(fake), client))

    # The name is output as the arguments are (a whole answer is counted so too).
    assert "".join(event.text for event in chunks(events)) == 'lookup{"query":"real200 docs"}'
    first_call = chunks(events)[1].choices[0]["delta"]["tool_calls"][0]
    assert first_call["function"]["name"] == "lookup"
    assert chunks(events)[-1].choices[0]["finish_reason"] == "tool_calls"


async def test_a_stream_cut_by_max_tokens_finishes_with_length(fake, client) -> None:
    fake.configure(tokens=10)

    events = await collect(
        provider.stream(chat(max_tokens=3, stream=True), upstream_for(fake), client)
    )

    assert "".join(event.text for event in chunks(events)) == text_for(3)
    assert chunks(events)[-1].choices[0]["finish_reason"] == "length"


# --- closing ----------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_upstream_connection_at_once(fake, client) -> None:
    fake.configure(tokens=200, pace=0.02)
    events = provider.stream(chat(stream=True), upstream_for(fake), client)
    received = 0
    async for event in events:
        received += isinstance(event, ChunkEvent) and bool(event.text)
        if received == 3:
            break

    closed_at = time.monotonic()
    await events.aclose()

    call = fake.calls[-1]
    assert await call.await_disconnected(2.0)
    assert call.disconnected_at - closed_at < 0.5
    assert call.tokens_at_disconnect < 10


async def test_cancelling_the_reader_closes_the_upstream_connection(fake, client) -> None:
    # A client that leaves the gateway cancels the task that reads the stream.
    fake.configure(tokens=200, pace=0.02)

    async def read() -> None:
        async for _ in provider.stream(chat(stream=True), upstream_for(fake), client):
            pass

    reader = asyncio.create_task(read())
    (call,) = await fake.await_calls(1)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader

    assert await call.await_disconnected(2.0)
    assert call.tokens_at_disconnect < 50


# --- failures ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def complete_or_stream(stream: bool, request: ChatRequest, upstream: Upstream, client) -> Any:
    if stream:
        return await collect(provider.stream(request, upstream, client))
    return await provider.complete(request, upstream, client)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_refused_connection_is_unavailable(client, stream: bool) -> None:
    upstream = Upstream(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="k", model="m")

    with pytest.raises(UpstreamUnavailable) as caught:
        await complete_or_stream(stream, chat(stream=stream), upstream, client)

    assert not caught.value.timeout


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("status", [500, 502, 503, 429, 401, 403, 404])
async def test_a_server_error_a_rate_limit_or_a_broken_channel_is_unavailable(
    fake, client, stream: bool, status: int
) -> None:
    fake.configure(fail_status=status)

    with pytest.raises(UpstreamUnavailable) as caught:
        await complete_or_stream(stream, chat(stream=stream), upstream_for(fake), client)

    assert caught.value.status == status
    assert "fake upstream failure" in str(caught.value)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_bad_request_is_rejected_with_the_upstreams_error(fake, client, stream) -> None:
    fake.configure(fail_status=400)

    with pytest.raises(UpstreamRejected) as caught:
        await complete_or_stream(stream, chat(stream=stream), upstream_for(fake), client)

    assert caught.value.status == 400
    assert caught.value.body == {
        "error": {
            "message": "fake upstream failure (400)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_no_headers_within_the_first_byte_timeout_is_unavailable(
    fake, client, stream: bool
) -> None:
    fake.configure(header_delay=5)
    upstream = upstream_for(fake, first_byte_timeout=0.2, chunk_timeout=10)
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as caught:
        await complete_or_stream(stream, chat(stream=stream), upstream, client)

    assert caught.value.timeout
    assert time.monotonic() - started < 2
    assert await fake.calls[-1].await_disconnected(2.0)


async def test_a_stall_between_chunks_fails_after_the_chunk_timeout(fake, client) -> None:
    fake.configure(tokens=3, pace=5)
    upstream = upstream_for(fake, first_byte_timeout=10, chunk_timeout=0.2)
    started = time.monotonic()

    with pytest.raises(UpstreamFailed) as caught:
        await collect(provider.stream(chat(stream=True), upstream, client))

    assert caught.value.timeout
    assert time.monotonic() - started < 2
    assert await fake.calls[-1].await_disconnected(2.0)


async def test_chunks_may_take_longer_than_the_first_byte_timeout(fake, client) -> None:
    # Once the headers are in, the chunk timeout governs every read.
    fake.configure(tokens=2, pace=0.4)
    upstream = upstream_for(fake, first_byte_timeout=0.2, chunk_timeout=5)

    events = await collect(provider.stream(chat(stream=True), upstream, client))

    assert "".join(event.text for event in chunks(events)) == text_for(2)


async def test_a_connection_dropped_mid_stream_fails(fake, client) -> None:
    fake.configure(tokens=10, drop_after=2)
    received: list[StreamEvent] = []

    with pytest.raises(UpstreamFailed) as caught:
        await read_into(received, provider.stream(chat(stream=True), upstream_for(fake), client))

    assert not caught.value.timeout
    assert "".join(event.text for event in chunks(received)) == text_for(2)


async def test_a_connection_dropped_before_the_answer_is_unavailable(fake, client) -> None:
    fake.configure(drop_after=0)

    with pytest.raises(UpstreamUnavailable):
        await provider.complete(chat(), upstream_for(fake), client)


async def test_an_error_event_mid_stream_fails(fake, client) -> None:
    fake.configure(tokens=5, error_after=2)

    with pytest.raises(UpstreamFailed, match="fake failure mid-stream"):
        await collect(provider.stream(chat(stream=True), upstream_for(fake), client))


async def test_a_stream_may_last_longer_than_its_chunk_timeout(fake, client) -> None:
    # The timeout is between two chunks, not over the whole stream.
    fake.configure(tokens=6, pace=0.15)
    upstream = upstream_for(fake, first_byte_timeout=5, chunk_timeout=0.4)

    events = await collect(provider.stream(chat(stream=True), upstream, client))

    assert "".join(event.text for event in chunks(events)) == text_for(6)


@pytest.mark.parametrize(
    ("counts", "usage"),
    [
        ({"prompt": 12.0, "completion": 3.0}, Usage(12, 3)),
        ({"prompt": 0, "completion": 0}, Usage(0, 0)),
        ({"prompt": None, "completion": 3}, None),
        ({"prompt": 12, "completion": "3"}, None),
        ({"prompt": -4, "completion": 3}, None),
        ({"prompt": 12, "completion": True}, None),
        ({"prompt": 10, "completion": 2.5}, None),
        ({"prompt": 10, "completion": 1, "cached": 12}, Usage(10, 1, cached_tokens=10)),
        ({"prompt": 10, "completion": 1, "cached": -3}, Usage(10, 1)),
        (
            {"prompt": 10, "completion": 1, "cached": 6, "cache_write": 9},
            Usage(10, 1, cached_tokens=6, cache_write_tokens=4),
        ),
    ],
)
def test_reported_usage_is_whole_tokens_with_the_cache_inside_the_prompt(counts, usage) -> None:
    assert Usage.reported(**counts) == usage
