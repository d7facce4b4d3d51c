"""The Anthropic Messages API, translated to and from OpenAI's chat completions.

Anthropic differs in ways that matter for billing as well as for shapes: its
``input_tokens`` excludes the tokens read from or written to the prompt cache, and in a
stream ``message_start`` carries the input usage while each ``message_delta`` carries the
output tokens so far (a running total, never an increment).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson

from apps.gateway.providers import _http, _shapes
from apps.gateway.providers.base import (
    ChatRequest,
    Completion,
    FinishReason,
    StreamEvent,
    Upstream,
    UpstreamFailed,
    UpstreamRejected,
    Usage,
    UsageEvent,
    token_count,
)

API_VERSION = "2023-06-01"

_FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


# What reading an answer of the wrong shape raises (a field missing, or of another type):
# the upstream's fault, which fails the call as a broken connection does.
_MALFORMED = (KeyError, TypeError, AttributeError)


def _malformed(error: Exception) -> UpstreamFailed:
    return UpstreamFailed(f"a malformed answer from the upstream ({type(error).__name__}: {error})")


def _text(value: object) -> str:
    """A field that must be text, as text (a TypeError otherwise: see _MALFORMED)."""
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


class AnthropicProvider:
    async def complete(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> Completion:
        body = _anthropic_body(request, upstream)
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            answer = await _http.read_json(r)
        if answer.get("type") != "message":
            raise UpstreamFailed(f"not a message: {_http.error_message(answer)}")
        try:
            return _completion(answer)
        except _MALFORMED as error:
            raise _malformed(error) from error

    async def stream(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> AsyncIterator[StreamEvent]:
        body = {**_anthropic_body(request, upstream), "stream": True}
        translator = _StreamTranslator()
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            async for data in _http.sse_data(r, upstream.chunk_timeout):
                try:
                    events = list(translator.feed(_http.parse_json(data)))
                except _MALFORMED as error:
                    raise _malformed(error) from error
                for event in events:
                    yield event
                if translator.stopped:
                    return
        raise UpstreamFailed("the stream ended before message_stop")


# --- OpenAI request -> Anthropic request ------------------------------------------------


def _anthropic_body(request: ChatRequest, upstream: Upstream) -> dict[str, Any]:
    source = request.body
    system, messages = _messages(source["messages"])
    body: dict[str, Any] = {
        "model": upstream.model,
        "max_tokens": request.max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = system
    if stop := source.get("stop"):
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if (temperature := source.get("temperature")) is not None:
        # OpenAI accepts 0..2, Anthropic 0..1: keep the usual values as they are and cap
        # the rest rather than fail a request the customer could send to OpenAI.
        body["temperature"] = min(temperature, 1.0)
    if (top_p := source.get("top_p")) is not None:
        body["top_p"] = top_p
    if tools := source.get("tools"):
        body["tools"] = [_tool(tool["function"]) for tool in tools]
        choice = _tool_choice(source.get("tool_choice"), source.get("parallel_tool_calls"))
        if choice:
            body["tool_choice"] = choice
    return body


def _messages(
    messages: list[dict[str, Any]],
) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
    """Split out the system prompt and turn the rest into Anthropic turns.

    Anthropic has one top-level system prompt, no tool role (tool results are blocks of a
    user turn) and wants user and assistant turns to alternate, so consecutive turns of one
    role are merged. The system prompt is one string, or its blocks when the customer
    marked one for Anthropic's prompt cache.
    """
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        role = message["role"]
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(b for b in _blocks(content, position) if b["type"] == "text")
            continue
        if role == "tool":
            role = "user"
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
            }
            if blocks := _blocks(content, position):
                result["content"] = blocks
            blocks = [result]
        else:
            blocks = _blocks(content, position)
            if role == "assistant":
                blocks += [_tool_use(call, position) for call in message.get("tool_calls") or ()]
        if not blocks:  # Anthropic refuses empty turns
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if any("cache_control" in block for block in system):
        return system, turns  # blocks keep the customer's cache breakpoints
    return "\n\n".join(block["text"] for block in system), turns


def _blocks(content: str | list[dict[str, Any]] | None, position: int) -> list[dict[str, Any]]:
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "refusal"):
            if not part.get(kind):  # Anthropic refuses empty text blocks
                continue
            block = {"type": "text", "text": part[kind]}
        elif kind == "image_url":
            block = _image(part["image_url"]["url"], position)
        else:
            raise _rejected(f"content parts of type {kind!r} are not supported", position)
        if "cache_control" in part:
            block["cache_control"] = _cache_control(part["cache_control"], position)
        blocks.append(block)
    return blocks


def _cache_control(mark: dict[str, Any], position: int) -> dict[str, Any]:
    """A prompt-cache breakpoint, as OpenRouter and LiteLLM pass it on a content part.

    Only Anthropic's five-minute cache: a one-hour write costs twice the input price,
    which the model's single cache-write price would not charge."""
    if mark.get("type") != "ephemeral" or mark.get("ttl", "5m") != "5m":
        raise _rejected(
            'cache_control other than {"type": "ephemeral"} (the five-minute cache) '
            "is not supported",
            position,
        )
    return {"type": "ephemeral"}


def _image(url: str, position: int) -> dict[str, Any]:
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, _, data = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    if encoding != "base64":
        raise _rejected("image data URLs must be base64-encoded", position)
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _tool_use(call: dict[str, Any], position: int) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = orjson.loads(function.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise _rejected("tool call arguments must be a JSON object", position)
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    tool = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


def _tool_choice(
    choice: str | dict[str, Any] | None, parallel: bool | None
) -> dict[str, Any] | None:
    if isinstance(choice, dict):
        result = {"type": "tool", "name": choice["function"]["name"]}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "auto" or parallel is False:
        result = {"type": "auto"}
    else:
        return None
    if parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def _rejected(reason: str, position: int) -> UpstreamRejected:
    """A request this upstream cannot express, refused before anything is sent."""
    param = f"messages[{position}]"
    message = f"{reason} by this model ({param})."
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }
    return UpstreamRejected(message, status=400, body=body)


# --- Anthropic answer -> OpenAI answer --------------------------------------------------


def _completion(answer: dict[str, Any]) -> Completion:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in answer.get("content") or ():
        if block.get("type") == "text":
            texts.append(_text(block["text"]))
        elif block.get("type") == "tool_use":
            arguments = orjson.dumps(block.get("input", {})).decode()
            tool_calls.append(
                _shapes.tool_call(_text(block["id"]), _text(block["name"]), arguments)
            )
    finish_reason = _finish_reason(answer.get("stop_reason"))
    choice = _shapes.choice("".join(texts), tool_calls, finish_reason)
    return Completion(response={"choices": [choice]}, usage=_usage(answer.get("usage")))


class _StreamTranslator:
    """Turns Anthropic stream events into OpenAI chunks and usage totals, one at a time."""

    def __init__(self) -> None:
        # OpenAI numbers tool calls among tool calls; Anthropic numbers all content blocks.
        self._tool_index: dict[int, int] = {}
        self._usage: dict[str, Any] = {}
        self.stopped = False

    def feed(self, event: dict[str, Any]) -> Iterator[StreamEvent]:
        kind = event.get("type")
        if kind == "message_start":
            yield _shapes.role_chunk()
            yield from self._usage_event((event.get("message") or {}).get("usage"))
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tool_index[event["index"]] = len(self._tool_index)
                yield _shapes.tool_call_start_chunk(index, _text(block["id"]), _text(block["name"]))
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                yield _shapes.content_chunk(_text(delta["text"]))
            elif delta.get("type") == "input_json_delta":
                index = self._tool_index[event["index"]]
                yield _shapes.arguments_chunk(index, _text(delta["partial_json"]))
        elif kind == "message_delta":
            if stop_reason := (event.get("delta") or {}).get("stop_reason"):
                yield _shapes.finish_chunk(_finish_reason(stop_reason))
            yield from self._usage_event(event.get("usage"))
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            raise UpstreamFailed(f"error event: {_http.error_message(event)}")
        # ping, content_block_stop and thinking deltas carry nothing for the client.

    def _usage_event(self, usage: object) -> Iterator[UsageEvent]:
        if not isinstance(usage, dict):
            return
        # Every field Anthropic sends is a total so far: the newest value replaces the last.
        self._usage.update({key: value for key, value in usage.items() if value is not None})
        if counted := _usage(self._usage):
            yield UsageEvent(counted)


def _finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    # input_tokens leaves out the prompt tokens read from or written to the cache.
    plain = token_count(usage.get("input_tokens"))
    if plain is None:
        return None
    cache_read = token_count(usage.get("cache_read_input_tokens")) or 0
    cache_write = token_count(usage.get("cache_creation_input_tokens")) or 0
    return Usage.reported(
        prompt=plain + cache_read + cache_write,
        completion=usage.get("output_tokens"),
        cached=cache_read,
        cache_write=cache_write,
    )


def _url(upstream: Upstream) -> str:
    return f"{upstream.base_url.rstrip('/')}/messages"


def _headers(upstream: Upstream) -> dict[str, str]:
    return {"x-api-key": upstream.api_key, "anthropic-version": API_VERSION}
