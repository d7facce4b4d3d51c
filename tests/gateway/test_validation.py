"""validate_chat_request against API.md: every bad parameter named, every good one kept.

Pure functions: no database, no server.
"""

from __future__ import annotations

from typing import Any

import pytest

from apps.gateway.errors import InvalidRequest
from apps.gateway.validation import validate_chat_request
from tests.gateway.bad_requests import BAD_REQUESTS, BASE, TOOL, USER


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_a_bad_parameter_is_refused_naming_it(body: Any, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate_chat_request(body)
    error = refused.value.body()["error"]
    assert refused.value.status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"temperature": 0, "top_p": 0}, id="lowest-sampling"),
        pytest.param({"temperature": 2, "top_p": 1}, id="highest-sampling"),
        pytest.param({"presence_penalty": -2, "frequency_penalty": 2}, id="penalty-bounds"),
        pytest.param({"temperature": None, "top_p": None, "stop": None}, id="nulls-as-defaults"),
        pytest.param({"stop": "END"}, id="stop-a-string"),
        pytest.param({"stop": ["a", "b", "c", "d"]}, id="stop-four-entries"),
        pytest.param({"stream": False}, id="stream-false"),
        pytest.param({"response_format": {"type": "json_object"}}, id="json-mode"),
        pytest.param(
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}},
                }
            },
            id="json-schema",
        ),
        pytest.param({"tools": [TOOL], "tool_choice": "required"}, id="tool-choice-required"),
        pytest.param(
            {
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            id="tool-choice-named",
        ),
        pytest.param({"seed": -(2**63)}, id="seed-lowest"),
        pytest.param({"n": 8, "user": "u-1", "logit_bias": {"50256": -100}}, id="other-params"),
        pytest.param({"logprobs": True, "top_logprobs": 20}, id="logprobs"),
    ],
)
def test_good_parameters_are_accepted_and_forwarded(fields: dict[str, Any]) -> None:
    valid = validate_chat_request({**BASE, **fields})
    assert valid.model == "gpt-4o"
    assert valid.body == {**BASE, **fields}


def test_unknown_fields_are_dropped_as_openai_ignores_them() -> None:
    valid = validate_chat_request({**BASE, "frobnicate": True, "temperature": 0.2})
    assert valid.body == {**BASE, "temperature": 0.2}


def test_the_output_limit_is_kept_apart_under_the_name_the_customer_used() -> None:
    plain = validate_chat_request({**BASE, "max_tokens": 30})
    newer = validate_chat_request({**BASE, "max_completion_tokens": 40})
    unset = validate_chat_request(BASE)
    assert validate_chat_request({**BASE, "max_tokens": 1}).max_tokens == 1
    assert (plain.max_tokens, plain.max_tokens_field) == (30, "max_tokens")
    assert (newer.max_tokens, newer.max_tokens_field) == (40, "max_completion_tokens")
    assert (unset.max_tokens, unset.max_tokens_field) == (None, "max_tokens")
    for valid in (plain, newer, unset):
        assert "max_tokens" not in valid.body
        assert "max_completion_tokens" not in valid.body


@pytest.mark.parametrize(
    ("fields", "stream", "include_usage"),
    [
        ({}, False, False),
        ({"stream": True}, True, False),
        ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
    ],
)
def test_stream_and_usage_requests_are_read(fields, stream, include_usage) -> None:
    valid = validate_chat_request({**BASE, **fields})
    assert (valid.stream, valid.include_usage) == (stream, include_usage)


def test_a_tool_conversation_is_accepted() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "assistant", "content": None, "refusal": "No."},
        {
            "role": "user",
            "name": "ann",
            "content": [
                {"type": "text", "text": "And this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
    ]
    valid = validate_chat_request({**BASE, "messages": messages, "tools": [TOOL]})
    assert valid.body["messages"] == messages
