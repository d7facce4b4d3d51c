"""The built-in demo model, and the registry of adapters."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from apps.gateway.providers import get_provider
from apps.gateway.providers.anthropic import AnthropicProvider
from apps.gateway.providers.base import (
    ChatRequest,
    ChunkEvent,
    Completion,
    StreamEvent,
    Upstream,
    Usage,
    UsageEvent,
)
from apps.gateway.providers.demo import DemoProvider
from apps.gateway.providers.openai import OpenAIProvider
from apps.gateway.tokens import count_prompt_tokens, count_text_tokens

provider = DemoProvider()
UPSTREAM = Upstream(base_url="", api_key="", model="demo")
MESSAGES = [{"role": "user", "content": "Tell me about yourself."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "detailed": {"type": "boolean"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def chat(max_tokens: int = 200, **body: Any) -> ChatRequest:
    return ChatRequest(body={"model": "demo", "messages": MESSAGES, **body}, max_tokens=max_tokens)


async def complete(request: ChatRequest, upstream: Upstream = UPSTREAM) -> Completion:
    # No client: the demo must never touch the network.
    return await provider.complete(request, upstream, None)


async def collect(request: ChatRequest, upstream: Upstream = UPSTREAM) -> list[StreamEvent]:
    return [event async for event in provider.stream(request, upstream, None)]


def message(completion: Completion) -> dict[str, Any]:
    return completion.response["choices"][0]["message"]


def finish_reason(completion: Completion) -> str:
    return completion.response["choices"][0]["finish_reason"]


def chunks(events: list[StreamEvent]) -> list[ChunkEvent]:
    return [event for event in events if isinstance(event, ChunkEvent)]


# --- text -------------------------------------------------------------------------------


async def test_the_same_request_gets_the_same_answer() -> None:
    first, second = await complete(chat()), await complete(chat())
    other = await complete(chat(messages=[{"role": "user", "content": "Something else."}]))

    assert message(first)["content"] == message(second)["content"]
    assert message(first)["content"] != message(other)["content"]
    assert message(first)["content"].endswith(".")


async def test_usage_is_counted_exactly_with_the_tokenizer() -> None:
    completion = await complete(chat())

    assert completion.usage == Usage(
        prompt_tokens=count_prompt_tokens(MESSAGES, "demo"),
        completion_tokens=count_text_tokens(message(completion)["content"], "demo"),
    )
    assert finish_reason(completion) == "stop"


async def test_max_tokens_cuts_the_answer_with_finish_length() -> None:
    whole = message(await complete(chat()))["content"]

    completion = await complete(chat(max_tokens=4))

    assert whole.startswith(message(completion)["content"])
    assert completion.usage.completion_tokens == 4
    assert finish_reason(completion) == "length"


@pytest.mark.parametrize("as_list", [False, True])
async def test_a_stop_sequence_ends_the_answer_before_it(as_list: bool) -> None:
    whole = message(await complete(chat()))["content"]
    word = whole.split()[3]
    stop = ["no such text", word] if as_list else word

    completion = await complete(chat(stop=stop))

    assert message(completion)["content"] == whole[: whole.index(word)]
    assert finish_reason(completion) == "stop"


async def test_json_mode_answers_a_json_object() -> None:
    content = message(await complete(chat(response_format={"type": "json_object"})))["content"]

    assert isinstance(orjson.loads(content), dict)


async def test_a_json_schema_is_followed() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}

    content = message(await complete(chat(response_format=response_format)))["content"]

    assert set(orjson.loads(content)) == {"name", "age"}


# --- tools ------------------------------------------------------------------------------


async def test_with_tools_it_calls_the_first_with_its_required_arguments() -> None:
    completion = await complete(chat(tools=[WEATHER, CLOCK]))

    (call,) = message(completion)["tool_calls"]
    assert message(completion)["content"] is None
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {
        "city": "demo",
        "unit": "celsius",
        "days": 1,
    }
    assert finish_reason(completion) == "tool_calls"
    assert completion.usage.completion_tokens == count_text_tokens(
        call["function"]["arguments"], "demo"
    )


async def test_a_named_tool_choice_calls_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}

    completion = await complete(chat(tools=[WEATHER, CLOCK], tool_choice=choice))

    (call,) = message(completion)["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": "{}"}


async def test_tool_choice_none_answers_in_words() -> None:
    completion = await complete(chat(tools=[WEATHER], tool_choice="none"))

    assert "tool_calls" not in message(completion)
    assert finish_reason(completion) == "stop"


async def test_once_the_tool_answered_it_answers_in_words_unless_required() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]

    after_result = await complete(chat(messages=messages, tools=[CLOCK]))
    required = await complete(chat(messages=messages, tools=[CLOCK], tool_choice="required"))

    assert finish_reason(after_result) == "stop"
    assert finish_reason(required) == "tool_calls"


# --- streams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"max_tokens": 5}, {"tools": [WEATHER]}, {"response_format": {"type": "json_object"}}],
    ids=["text", "cut", "tool", "json"],
)
async def test_a_stream_says_what_the_whole_answer_says(options: dict[str, Any]) -> None:
    request = chat(**options)

    completion = await complete(request)
    events = await collect(request)

    whole = message(completion)
    streamed = "".join(event.text for event in chunks(events))
    if whole["content"]:
        assert streamed == whole["content"]
    else:  # a tool call: its name and its arguments are output
        function = whole["tool_calls"][0]["function"]
        assert streamed == function["name"] + function["arguments"]
    assert chunks(events)[0].choices[0]["delta"]["role"] == "assistant"
    assert chunks(events)[-1].choices[0]["finish_reason"] == finish_reason(completion)
    assert all(event.choices[0]["finish_reason"] is None for event in chunks(events)[:-1])
    assert events[-1] == UsageEvent(completion.usage)


async def test_a_streamed_tool_call_opens_then_sends_its_arguments() -> None:
    events = await collect(chat(tools=[WEATHER]))

    opening = chunks(events)[1].choices[0]["delta"]["tool_calls"][0]
    assert opening["index"] == 0
    assert opening["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [event.choices[0]["delta"]["tool_calls"][0] for event in chunks(events)[2:-1]]
    assert all(fragment["index"] == 0 for fragment in fragments)


async def test_a_stream_keeps_the_configured_pace() -> None:
    upstream = Upstream(base_url="", api_key="", model="demo", settings={"pace_ms": 30})
    request = chat(max_tokens=10)
    started = time.monotonic()
    arrivals = [time.monotonic() - started async for _ in provider.stream(request, upstream, None)]

    assert arrivals[-1] >= 10 * 0.03
    assert arrivals[1] < arrivals[-1] / 2  # the first token came long before the last


async def test_characters_split_across_tokens_are_never_sent_broken() -> None:
    # The JSON answer carries the schema's Chinese property name; its characters may span
    # tokens, and no chunk may hold half of one.
    schema = {"type": "object", "properties": {"城市": {"type": "string"}}, "required": ["城市"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}

    events = await collect(chat(response_format=response_format))

    texts = [event.text for event in chunks(events)]
    assert "\ufffd" not in "".join(texts)
    assert orjson.loads("".join(texts)) == {"城市": "demo"}


# --- the registry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "adapter"),
    [("openai", OpenAIProvider), ("anthropic", AnthropicProvider), ("demo", DemoProvider)],
)
def test_each_kind_has_its_adapter(kind: str, adapter: type) -> None:
    assert isinstance(get_provider(kind), adapter)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError, match="gemini"):
        get_provider("gemini")


async def test_stream_chunks_arrive_one_token_at_a_time() -> None:
    events: AsyncIterator[StreamEvent] = provider.stream(chat(max_tokens=6), UPSTREAM, None)
    texts = [event.text async for event in events if isinstance(event, ChunkEvent) and event.text]

    assert len(texts) == 6
