"""The built-in demo model: answers without any network, so a fresh install works at once.

The answer depends only on the request (a hash of its messages picks the sentences), so a
test can repeat it; it honours max_tokens, stop sequences, tools and JSON mode the way a
real model would, at ``upstream.settings["pace_ms"]`` milliseconds per token, and reports
exact usage counted with the same tokenizer the gateway uses.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import tiktoken

from apps.gateway import tokens
from apps.gateway.providers import _shapes
from apps.gateway.providers.base import (
    ChatRequest,
    Completion,
    FinishReason,
    StreamEvent,
    Upstream,
    Usage,
    UsageEvent,
)

SENTENCES = (
    "Hello from the real200 demo model.",
    "This answer was written without calling any upstream provider.",
    "The same question always gets the same reply, which keeps tests repeatable.",
    "Every token you see here is counted and billed like a real one.",
    "Connect a real channel in the admin to talk to a real model.",
    "Streaming works too: each token arrives as soon as it is ready.",
    "The weather in the demo is always mild and sunny.",
    "A short answer is often the most useful one.",
    "Your balance, your keys and your usage are all on the dashboard.",
    "Thank you for trying real200.",
)


class DemoProvider:
    async def complete(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> Completion:
        answer = await _answer(request, upstream)
        await asyncio.sleep(_pace(upstream) * answer.usage.completion_tokens)
        if answer.tool:
            call = _shapes.tool_call(answer.tool.call_id, answer.tool.name, answer.text)
            choice = _shapes.choice("", [call], answer.finish_reason)
        else:
            choice = _shapes.choice(answer.text, [], answer.finish_reason)
        return Completion(
            response={"choices": [choice], "system_fingerprint": "fp_demo"}, usage=answer.usage
        )

    async def stream(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> AsyncIterator[StreamEvent]:
        answer = await _answer(request, upstream)
        pace = _pace(upstream)
        yield _shapes.role_chunk()
        if answer.tool:
            yield _shapes.tool_call_start_chunk(0, answer.tool.call_id, answer.tool.name)
        for piece in answer.pieces:
            if pace:
                await asyncio.sleep(pace)
            if not piece:  # a token that ends inside a character: its text comes with the next
                continue
            if answer.tool:
                yield _shapes.arguments_chunk(0, piece)
            else:
                yield _shapes.content_chunk(piece)
        yield _shapes.finish_chunk(answer.finish_reason)
        yield UsageEvent(answer.usage)


@dataclass(frozen=True, slots=True)
class _ToolCall:
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class _Answer:
    pieces: list[str]  # the text of each token, "" where a character spans two tokens
    finish_reason: FinishReason
    usage: Usage
    tool: _ToolCall | None  # set when the answer is a call: the text is its arguments

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def _answer(request: ChatRequest, upstream: Upstream) -> _Answer:
    # Tokenizing costs CPU in proportion to the prompt: keep it off the event loop.
    return await asyncio.to_thread(_compose, request, upstream.model)


def _compose(request: ChatRequest, model: str) -> _Answer:
    body = request.body
    digest = hashlib.sha256(orjson.dumps(body["messages"], option=orjson.OPT_SORT_KEYS)).digest()
    finish_reason: FinishReason = "stop"
    tool = None
    if function := _function_to_call(body):
        tool = _ToolCall(call_id=f"call_{digest[:12].hex()}", name=function["name"])
        # A function without parameters still takes an (empty) object.
        parameters = function.get("parameters") or {"type": "object"}
        text = orjson.dumps(_example(parameters)).decode()
        finish_reason = "tool_calls"
    else:
        text = _cut_at_stop(_reply(body.get("response_format"), digest), body.get("stop"))
    encoding = tokens.encoding_for_model(model)
    ids = encoding.encode_ordinary(text)
    if len(ids) > request.max_tokens:
        ids = ids[: request.max_tokens]
        finish_reason = "length"
    usage = Usage(
        prompt_tokens=tokens.count_prompt_tokens(body["messages"], model, body.get("tools")),
        completion_tokens=len(ids),
    )
    return _Answer(_pieces(encoding, ids), finish_reason, usage, tool)


def _function_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    functions = [tool["function"] for tool in tools]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next((f for f in functions if f["name"] == name), functions[0])
    # Once a tool's result is in, a real model usually answers in words; so does the demo,
    # or a client looping over tool calls would never finish.
    if choice == "auto" and body["messages"][-1].get("role") == "tool":
        return None
    return functions[0]


def _reply(response_format: dict[str, Any] | None, digest: bytes) -> str:
    count = 2 + digest[0] % 3
    sentences = [SENTENCES[byte % len(SENTENCES)] for byte in digest[1 : 1 + count]]
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return orjson.dumps({"answer": sentences[0]}).decode()
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return orjson.dumps(_example(schema)).decode()
    return " ".join(sentences)


def _cut_at_stop(text: str, stop: str | list[str] | None) -> str:
    """The text before the earliest stop sequence, as a model stops before emitting it."""
    sequences = [stop] if isinstance(stop, str) else stop or []
    ends = [text.find(sequence) for sequence in sequences if sequence and sequence in text]
    return text[: min(ends)] if ends else text


def _example(schema: dict[str, Any]) -> Any:
    """A small value that fits a JSON schema: its required properties, each one simple."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _example(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: _example(properties.get(name) or {}) for name in schema.get("required", ())}
    return {
        "array": [],
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "null": None,
    }.get(kind, "demo")


def _pieces(encoding: tiktoken.Encoding, ids: list[int]) -> list[str]:
    # A token may end in the middle of a UTF-8 character: hold its bytes until the character
    # is whole, so no chunk carries a broken character.
    pieces: list[str] = []
    pending = b""
    for token in ids:
        pending += encoding.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode())
        except UnicodeDecodeError:
            pieces.append("")
        else:
            pending = b""
    return pieces


def _pace(upstream: Upstream) -> float:
    return upstream.settings.get("pace_ms", 0) / 1000
