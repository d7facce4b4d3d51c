"""Every field of a rich, valid request replaced by each odd JSON value in turn: the
validator either accepts the body or refuses it with a 400. Never anything else (an
exception here is a 500 for the customer)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest

from apps.gateway.errors import InvalidRequest
from apps.gateway.validation import validate_chat_request

ODD_VALUES: list[Any] = [
    None, 0, 1, -1, 1.5, True, "", "x", "http://x", [], [1], [None], [{}], {}, {"a": 1},
    {"type": "text"}, {"type": "function"}, {"url": 1},
]  # fmt: skip

RICH = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "answer"}},
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["END"],
    "logit_bias": {"50256": -100},
    "temperature": 0.5,
    "max_tokens": 10,
    "n": 1,
    "logprobs": True,
    "top_logprobs": 2,
}


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        yield from _paths(child, (*path, key))


def _with(path: tuple, value: Any) -> Any:
    if not path:
        return value
    body = copy.deepcopy(RICH)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return body


def test_the_rich_request_itself_is_valid():
    assert validate_chat_request(copy.deepcopy(RICH)).model == "gpt-4o"


@pytest.mark.parametrize("path", list(_paths(RICH)), ids=lambda p: ".".join(map(str, p)) or "body")
def test_an_odd_value_anywhere_is_accepted_or_a_400(path):
    for value in ODD_VALUES:
        with contextlib.suppress(InvalidRequest):
            validate_chat_request(_with(path, value))
