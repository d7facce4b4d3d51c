"""Chat requests that break API.md, each with the `param` the 400 must name.

Shared by the unit tests of the validator and the live tests of the endpoint, so both
prove the same list.
"""

from __future__ import annotations

from typing import Any

import pytest

USER = {"role": "user", "content": "Hi"}
BASE: dict[str, Any] = {"model": "gpt-4o", "messages": [USER]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def _with(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def _without(name: str) -> dict[str, Any]:
    return {key: value for key, value in BASE.items() if key != name}


def _case(case_id: str, body: Any, param: str | None) -> Any:
    return pytest.param(body, param, id=case_id)


BAD_REQUESTS = [
    # The body itself.
    _case("body-an-array", [BASE], None),
    _case("body-a-string", "gpt-4o", None),
    _case("body-a-number", 42, None),
    _case("body-null", None, None),
    # model
    _case("model-missing", _without("model"), "model"),
    _case("model-a-number", _with(model=4), "model"),
    _case("model-empty", _with(model="  "), "model"),
    # messages
    _case("messages-missing", _without("messages"), "messages"),
    _case("messages-empty", _with(messages=[]), "messages"),
    _case("messages-an-object", _with(messages=USER), "messages"),
    _case("message-a-string", _with(messages=["Hi"]), "messages[0]"),
    _case("role-unknown", _with(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    _case("role-missing", _with(messages=[{"content": "x"}]), "messages[0].role"),
    _case("content-missing", _with(messages=[{"role": "user"}]), "messages[0].content"),
    _case(
        "content-a-number",
        _with(messages=[USER, {"role": "user", "content": 7}]),
        "messages[1].content",
    ),
    _case(
        "content-no-parts", _with(messages=[{"role": "user", "content": []}]), "messages[0].content"
    ),
    _case(
        "content-part-unknown",
        _with(messages=[{"role": "user", "content": [{"type": "video"}]}]),
        "messages[0].content[0]",
    ),
    _case(
        "content-text-not-a-string",
        _with(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
        "messages[0].content[0].text",
    ),
    _case(
        "content-cache-control-not-an-object",
        _with(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "5m"}]}
            ]
        ),
        "messages[0].content[0].cache_control",
    ),
    _case(
        "content-image-without-url",
        _with(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content[0].image_url.url",
    ),
    _case(
        "system-with-an-image",
        _with(
            messages=[
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        "messages[0].content[0]",
    ),
    _case(
        "assistant-null-content-without-tool-calls",
        _with(messages=[USER, {"role": "assistant", "content": None}]),
        "messages[1].content",
    ),
    _case(
        "assistant-bad-tool-calls",
        _with(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]),
        "messages[1].tool_calls[0]",
    ),
    _case(
        "tool-message-without-tool-call-id",
        _with(messages=[USER, {"role": "tool", "content": "18°C"}]),
        "messages[1].tool_call_id",
    ),
    _case(
        "name-not-a-string",
        _with(messages=[{"role": "user", "content": "x", "name": 3}]),
        "messages[0].name",
    ),
    # Sampling.
    _case("temperature-a-string", _with(temperature="hot"), "temperature"),
    _case("temperature-a-boolean", _with(temperature=True), "temperature"),
    _case("temperature-above-2", _with(temperature=2.01), "temperature"),
    _case("temperature-negative", _with(temperature=-0.1), "temperature"),
    _case("top-p-above-1", _with(top_p=1.5), "top_p"),
    _case("top-p-negative", _with(top_p=-0.5), "top_p"),
    _case("top-p-a-string", _with(top_p="0.5"), "top_p"),
    _case("presence-penalty-above-2", _with(presence_penalty=2.5), "presence_penalty"),
    _case("presence-penalty-below-minus-2", _with(presence_penalty=-3), "presence_penalty"),
    _case("frequency-penalty-above-2", _with(frequency_penalty=3), "frequency_penalty"),
    _case("frequency-penalty-below-minus-2", _with(frequency_penalty=-2.5), "frequency_penalty"),
    _case("frequency-penalty-a-list", _with(frequency_penalty=[1]), "frequency_penalty"),
    # Output limit.
    _case("max-tokens-zero", _with(max_tokens=0), "max_tokens"),
    _case("max-tokens-negative", _with(max_tokens=-5), "max_tokens"),
    _case("max-tokens-a-float", _with(max_tokens=10.5), "max_tokens"),
    _case("max-tokens-a-string", _with(max_tokens="100"), "max_tokens"),
    _case("max-tokens-a-boolean", _with(max_tokens=True), "max_tokens"),
    _case("max-completion-tokens-zero", _with(max_completion_tokens=0), "max_completion_tokens"),
    _case(
        "max-completion-tokens-a-string",
        _with(max_completion_tokens="9"),
        "max_completion_tokens",
    ),
    # stream
    _case("stream-a-string", _with(stream="true"), "stream"),
    _case("stream-a-number", _with(stream=1), "stream"),
    # stop
    _case("stop-five-entries", _with(stop=["a", "b", "c", "d", "e"]), "stop"),
    _case("stop-a-number", _with(stop=7), "stop"),
    _case("stop-not-strings", _with(stop=["a", 1]), "stop"),
    # response_format
    _case("response-format-a-string", _with(response_format="json"), "response_format"),
    _case(
        "response-format-unknown-type",
        _with(response_format={"type": "xml"}),
        "response_format.type",
    ),
    _case("response-format-no-type", _with(response_format={}), "response_format.type"),
    _case(
        "response-format-json-schema-without-schema",
        _with(response_format={"type": "json_schema"}),
        "response_format.json_schema",
    ),
    _case(
        "response-format-json-schema-without-name",
        _with(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema",
    ),
    # tools
    _case("tools-an-object", _with(tools=TOOL), "tools"),
    _case("tools-not-functions", _with(tools=[{"type": "retrieval"}]), "tools[0]"),
    _case("tools-a-string", _with(tools=[TOOL, "get_weather"]), "tools[1]"),
    _case(
        "tool-name-with-spaces",
        _with(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        "tools[0].function.name",
    ),
    _case(
        "tool-without-name",
        _with(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools[0].function.name",
    ),
    _case(
        "tool-parameters-a-list",
        _with(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
        "tools[0].function.parameters",
    ),
    _case(
        "tool-description-a-number",
        _with(tools=[{"type": "function", "function": {"name": "f", "description": 1}}]),
        "tools[0].function.description",
    ),
    # tool_choice
    _case("tool-choice-unknown-mode", _with(tools=[TOOL], tool_choice="always"), "tool_choice"),
    _case("tool-choice-a-number", _with(tools=[TOOL], tool_choice=1), "tool_choice"),
    _case(
        "tool-choice-without-function",
        _with(tools=[TOOL], tool_choice={"type": "function"}),
        "tool_choice",
    ),
    _case(
        "tool-choice-names-an-unknown-tool",
        _with(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        "tool_choice",
    ),
    # The other OpenAI parameters, by type.
    _case("seed-a-string", _with(seed="42"), "seed"),
    _case("seed-a-float", _with(seed=4.2), "seed"),
    _case("n-zero", _with(n=0), "n"),
    _case("n-too-many", _with(n=9), "n"),
    _case("user-a-number", _with(user=5), "user"),
    _case("logit-bias-out-of-range", _with(logit_bias={"50256": 101}), "logit_bias"),
    _case("logit-bias-a-list", _with(logit_bias=[1]), "logit_bias"),
    _case("logprobs-a-string", _with(logprobs="yes"), "logprobs"),
    _case("top-logprobs-without-logprobs", _with(top_logprobs=3), "top_logprobs"),
    _case("top-logprobs-too-many", _with(logprobs=True, top_logprobs=21), "top_logprobs"),
    _case("parallel-tool-calls-a-string", _with(parallel_tool_calls="no"), "parallel_tool_calls"),
    _case(
        "stream-options-without-stream",
        _with(stream_options={"include_usage": True}),
        "stream_options",
    ),
    _case("stream-options-a-string", _with(stream=True, stream_options="usage"), "stream_options"),
    _case(
        "include-usage-a-string",
        _with(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
]
