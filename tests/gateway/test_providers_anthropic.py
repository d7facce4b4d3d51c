"""The Anthropic adapter against a real HTTP stand-in for the Messages API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from apps.gateway.providers.anthropic import AnthropicProvider
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
)
from tests.fakes import AnthropicFake, text_for

provider = AnthropicProvider()
MESSAGES = [{"role": "user", "content": "Say something."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[AnthropicFake]:
    with AnthropicFake() as fake:
        yield fake


@pytest.fixture
def fake(server: AnthropicFake) -> AnthropicFake:
    server.reset()
    return server


def upstream_for(fake: AnthropicFake, **options: Any) -> Upstream:
    return Upstream(base_url=fake.base_url, api_key="sk-ant-upstream", model="claude-up", **options)


def chat(max_tokens: int = 100, **body: Any) -> ChatRequest:
    body = {"model": "claude-sonnet-4", "messages": MESSAGES, **body}
    return ChatRequest(body=body, max_tokens=max_tokens)


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


async def sent_body(fake: AnthropicFake, client: aiohttp.ClientSession, **body: Any) -> dict:
    """What the upstream received for a chat request with these fields."""
    await provider.complete(chat(**body), upstream_for(fake), client)
    return fake.calls[-1].body


# --- the request ------------------------------------------------------------------------


async def test_the_request_goes_to_messages_with_anthropics_headers(fake, client) -> None:
    await provider.complete(chat(max_tokens=64), upstream_for(fake), client)

    call = fake.calls[-1]
    assert call.path == "/v1/messages"
    assert call.headers["x-api-key"] == "sk-ant-upstream"
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in call.headers
    assert call.body == {
        "model": "claude-up",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}],
    }


async def test_system_and_developer_messages_become_the_system_prompt(fake, client) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"},
    ]

    body = await sent_body(fake, client, messages=messages)

    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


async def test_images_become_image_blocks(fake, client) -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]

    body = await sent_body(fake, client, messages=[{"role": "user", "content": parts}])

    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_a_tool_conversation_becomes_alternating_turns(fake, client) -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]

    body = await sent_body(fake, client, messages=messages, tools=[WEATHER_TOOL])

    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": [{"type": "text", "text": "Sunny"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "Rain"}],
                },
                {"type": "text", "text": "Thanks. And tomorrow?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
async def test_tool_choice_is_translated(fake, client, tool_choice, parallel, expected) -> None:
    options = {"tool_choice": tool_choice, "parallel_tool_calls": parallel}
    options = {key: value for key, value in options.items() if value is not None}

    body = await sent_body(fake, client, tools=[WEATHER_TOOL], **options)

    assert body.get("tool_choice") == expected


@pytest.mark.parametrize(
    ("stop", "expected"), [("END", ["END"]), (["END", "\n\n"], ["END", "\n\n"])]
)
async def test_stop_becomes_stop_sequences(fake, client, stop, expected) -> None:
    body = await sent_body(fake, client, stop=stop)

    assert body["stop_sequences"] == expected


async def test_sampling_is_passed_with_temperature_capped_at_anthropics_limit(fake, client) -> None:
    assert (await sent_body(fake, client, temperature=0.7, top_p=0.9))["temperature"] == 0.7
    body = await sent_body(fake, client, temperature=1.6, top_p=0.9)
    assert body["temperature"] == 1.0
    assert body["top_p"] == 0.9


async def test_content_anthropic_cannot_take_is_rejected_before_sending(fake, client) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    messages = [{"role": "user", "content": [audio]}]

    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(chat(messages=messages), upstream_for(fake), client)

    assert caught.value.status == 400
    assert caught.value.body["error"]["param"] == "messages[0]"
    assert fake.calls == []


async def test_cache_breakpoints_reach_anthropic_on_their_blocks(fake, client) -> None:
    mark = {"type": "ephemeral"}
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "A long manual.", "cache_control": mark}],
        },
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": mark}]},
    ]

    body = await sent_body(fake, client, messages=messages)

    assert body["system"] == [
        {"type": "text", "text": "A long manual.", "cache_control": mark},
        {"type": "text", "text": "Be brief."},
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": mark}]}
    ]


@pytest.mark.parametrize("mark", [{"type": "ephemeral", "ttl": "1h"}, {"type": "persistent"}, {}])
async def test_a_cache_breakpoint_other_than_five_minutes_is_rejected(fake, client, mark) -> None:
    """A one-hour write costs twice the input price; the model's one cache-write price
    would undercharge it."""
    part = {"type": "text", "text": "Hi", "cache_control": mark}
    messages = [{"role": "user", "content": [part]}]

    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(chat(messages=messages), upstream_for(fake), client)

    assert caught.value.status == 400
    assert "five-minute" in caught.value.body["error"]["message"]
    assert fake.calls == []


async def test_tool_arguments_that_are_not_a_json_object_are_rejected(fake, client) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]

    with pytest.raises(UpstreamRejected):
        await provider.complete(chat(messages=messages), upstream_for(fake), client)

    assert fake.calls == []


# --- whole answers ----------------------------------------------------------------------


async def test_a_whole_answer_becomes_an_openai_choice(fake, client) -> None:
    fake.configure(tokens=3, tool_call={"name": "get_weather", "arguments": {"city": "Paris"}})

    completion = await provider.complete(chat(), upstream_for(fake), client)

    assert completion.response == {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text_for(3),
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "toolu_fake1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ]
    }


async def test_a_whole_answer_counts_cache_reads_and_writes_as_prompt(fake, client) -> None:
    fake.configure(tokens=4, prompt_tokens=10, cached_tokens=300, cache_creation_tokens=50)

    completion = await provider.complete(chat(), upstream_for(fake), client)

    assert completion.usage == Usage(
        prompt_tokens=360, completion_tokens=4, cached_tokens=300, cache_write_tokens=50
    )


async def test_a_whole_answer_without_cache_fields_has_no_cache_tokens(fake, client) -> None:
    fake.configure(tokens=4, prompt_tokens=10)

    completion = await provider.complete(chat(), upstream_for(fake), client)

    assert completion.usage == Usage(
        prompt_tokens=10, completion_tokens=4, cached_tokens=0, cache_write_tokens=0
    )


async def test_a_whole_answer_without_usage_says_so(fake, client) -> None:
    fake.configure(usage=False)

    assert (await provider.complete(chat(), upstream_for(fake), client)).usage is None


STOP_REASONS = [
    ("end_turn", "stop"),
    ("stop_sequence", "stop"),
    ("max_tokens", "length"),
    ("tool_use", "tool_calls"),
    ("refusal", "content_filter"),
]


@pytest.mark.parametrize(("stop_reason", "finish_reason"), STOP_REASONS)
async def test_stop_reasons_become_finish_reasons(fake, client, stop_reason, finish_reason) -> None:
    fake.configure(finish_reason=stop_reason)

    completion = await provider.complete(chat(), upstream_for(fake), client)
    events = await collect(provider.stream(chat(), upstream_for(fake), client))

    assert completion.response["choices"][0]["finish_reason"] == finish_reason
    assert chunks(events)[-1].choices[0]["finish_reason"] == finish_reason


# --- streams ----------------------------------------------------------------------------


async def test_a_stream_becomes_openai_chunks(fake, client) -> None:
    fake.configure(tokens=3, tool_call={"name": "get_weather", "arguments": {"city": "Paris"}})

    events = await collect(provider.stream(chat(), upstream_for(fake), client))

    assert fake.calls[-1].body["stream"] is True
    deltas = [event.choices[0]["delta"] for event in chunks(events)]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
    assert "".join(delta.get("content", "") for delta in deltas) == text_for(3)
    calls = [call for delta in deltas for call in delta.get("tool_calls", ())]
    # The tool is Anthropic's content block 1 but OpenAI's tool call 0.
    assert {call["index"] for call in calls} == {0}
    assert calls[0] == {
        "index": 0,
        "id": "toolu_fake1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert (
        "".join(event.text for event in chunks(events)) == text_for(3) + "get_weather" + arguments
    )
    assert chunks(events)[-1].choices[0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "tool_calls",
        "logprobs": None,
    }


async def test_stream_usage_is_the_running_total_never_a_sum(fake, client) -> None:
    # message_start reports 1 output token and message_delta the total so far: adding
    # them would bill one token too many, and adding repeated totals many more.
    fake.configure(
        tokens=5, prompt_tokens=10, cached_tokens=300, cache_creation_tokens=50, usage_repeats=2
    )

    events = await collect(provider.stream(chat(), upstream_for(fake), client))

    cache = {"cached_tokens": 300, "cache_write_tokens": 50}
    assert usages(events) == [
        Usage(prompt_tokens=360, completion_tokens=1, **cache),
        Usage(prompt_tokens=360, completion_tokens=5, **cache),
        Usage(prompt_tokens=360, completion_tokens=5, **cache),
    ]
    assert [event.choices[0]["finish_reason"] for event in chunks(events)].count("stop") == 1


async def test_a_stream_without_usage_yields_no_usage(fake, client) -> None:
    fake.configure(usage=False)

    events = await collect(provider.stream(chat(), upstream_for(fake), client))

    assert usages(events) == []


async def test_a_stream_is_passed_on_while_the_upstream_is_still_writing(fake, client) -> None:
    fake.configure(tokens=5, pace=0.3)
    started = time.monotonic()

    async for event in provider.stream(chat(), upstream_for(fake), client):
        if isinstance(event, ChunkEvent) and event.text:
            break

    assert time.monotonic() - started < 1.0
    assert not fake.calls[-1].completed


async def test_closing_the_stream_closes_the_upstream_connection_at_once(fake, client) -> None:
    fake.configure(tokens=200, pace=0.02)
    events = provider.stream(chat(), upstream_for(fake), client)
    async for event in events:
        if isinstance(event, ChunkEvent) and event.text:
            break

    closed_at = time.monotonic()
    await events.aclose()

    call = fake.calls[-1]
    assert await call.await_disconnected(2.0)
    assert call.disconnected_at - closed_at < 0.5
    assert call.tokens_at_disconnect < 10


# --- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 529, 429, 401])
async def test_overload_rate_limits_and_bad_keys_are_unavailable(fake, client, status) -> None:
    fake.configure(fail_status=status)

    with pytest.raises(UpstreamUnavailable) as caught:
        await collect(provider.stream(chat(), upstream_for(fake), client))

    assert caught.value.status == status


async def test_a_bad_request_is_rejected_in_openais_error_shape(fake, client) -> None:
    fake.configure(fail_status=400)

    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(chat(), upstream_for(fake), client)

    assert caught.value.body == {
        "error": {
            "message": "fake upstream failure (400)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


async def test_an_error_event_mid_stream_fails(fake, client) -> None:
    fake.configure(tokens=5, error_after=2)
    received: list[StreamEvent] = []

    with pytest.raises(UpstreamFailed, match="Overloaded"):
        await read_into(received, provider.stream(chat(), upstream_for(fake), client))

    assert "".join(event.text for event in chunks(received)) == text_for(2)


async def test_a_connection_dropped_mid_stream_fails(fake, client) -> None:
    fake.configure(tokens=10, drop_after=3)

    with pytest.raises(UpstreamFailed):
        await collect(provider.stream(chat(), upstream_for(fake), client))


async def test_a_stall_between_events_fails_after_the_chunk_timeout(fake, client) -> None:
    fake.configure(tokens=3, pace=5)
    upstream = upstream_for(fake, first_byte_timeout=10, chunk_timeout=0.2)

    with pytest.raises(UpstreamFailed) as caught:
        await collect(provider.stream(chat(), upstream, client))

    assert caught.value.timeout
