"""Any OpenAI-compatible upstream (OpenAI, DeepSeek, vLLM, Ollama, OpenRouter…).

The request is passed through as the customer sent it, with the upstream's model name, the
resolved output cap, and a request for usage at the end of a stream. The answer's
``choices`` come back as they were sent. A server that answers a streamed request with the
whole completion has it relayed as a stream, and one that streams a request that was not
(or a channel set `stream_only`) has its stream put together into the whole answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import aiohttp

from apps.gateway.providers import _http
from apps.gateway.providers.base import (
    TEXT_FIELDS,
    ChatRequest,
    ChunkEvent,
    Completion,
    StreamEvent,
    Upstream,
    UpstreamFailed,
    Usage,
    UsageEvent,
    output_text,
)


class OpenAIProvider:
    async def complete(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> Completion:
        if upstream.settings.get("stream_only"):
            # Models that answer only as a stream (the channel says so): streamed upstream,
            # the customer gets the whole answer.
            return await _completion_of(self.stream(request, upstream, client))
        body = _upstream_body(request, upstream)
        body.pop("stream", None)
        body.pop("stream_options", None)  # OpenAI refuses stream_options without stream
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            if r.content_type == "text/event-stream":  # a server that streams regardless
                return await _completion_of(_events(r, upstream))
            answer = await _http.read_json(r)
        response = {"choices": _answer_choices(answer)}
        if answer.get("system_fingerprint"):
            response["system_fingerprint"] = answer["system_fingerprint"]
        return Completion(response=response, usage=_usage(answer.get("usage")))

    async def stream(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> AsyncIterator[StreamEvent]:
        body = _upstream_body(request, upstream)
        body["stream"] = True
        if upstream.supports_stream_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            if r.content_type == "application/json":
                # A server that ignores `stream` answers the whole completion at once; it
                # bills the answer, so the customer gets it, as a stream.
                for event in _answer_as_events(await _http.read_json(r)):
                    yield event
                return
            async for event in _events(r, upstream):
                yield event


async def _events(
    response: aiohttp.ClientResponse, upstream: Upstream
) -> AsyncIterator[StreamEvent]:
    """The events of a streamed answer, from its SSE body."""
    finished = False
    async for data in _http.sse_data(response, upstream.chunk_timeout):
        if data == b"[DONE]":
            return
        chunk = _http.parse_json(data)
        if chunk.get("error"):  # how OpenRouter and vLLM report a failure mid-stream
            raise UpstreamFailed(f"error event: {_http.error_message(chunk)}")
        if choices := chunk.get("choices"):
            choices = _choices(choices, "delta")
            finished = finished or any(c.get("finish_reason") for c in choices)
            yield ChunkEvent(
                choices=choices,
                text=_generated_text(choices),
                system_fingerprint=chunk.get("system_fingerprint"),
            )
        # Some upstreams send usage on every chunk (or null): each is a running total.
        if usage := _usage(chunk.get("usage")):
            yield UsageEvent(usage)
    # Some servers omit [DONE]; an answer that never finished was cut short, though.
    if not finished:
        raise UpstreamFailed("the stream ended before the answer finished")


async def _completion_of(events: AsyncGenerator[StreamEvent, None]) -> Completion:
    """A stream's events put together into the whole answer: each choice's deltas joined
    into its message (text, refusal, each tool call's arguments by the call's index)."""
    choices: dict[int, dict[str, Any]] = {}
    usage: Usage | None = None
    fingerprint = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, UsageEvent):
                usage = event.usage  # a running total: the last is the whole
                continue
            fingerprint = event.system_fingerprint or fingerprint
            for choice in event.choices:
                index = choice.get("index", 0)
                whole = choices.setdefault(
                    index,
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": None},
                        "finish_reason": None,
                        "logprobs": None,
                    },
                )
                _add_delta(whole["message"], choice.get("delta") or {})
                whole["finish_reason"] = choice.get("finish_reason") or whole["finish_reason"]
    response: dict[str, Any] = {"choices": [choices[index] for index in sorted(choices)]}
    if fingerprint:
        response["system_fingerprint"] = fingerprint
    return Completion(response=response, usage=usage)


def _add_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for field in TEXT_FIELDS:
        if isinstance(text := delta.get(field), str) and text:
            message[field] = (message.get(field) or "") + text
    for fragment in delta.get("tool_calls") or ():
        calls = message.setdefault("tool_calls", [])
        position = fragment.get("index", len(calls))
        if not 0 <= position <= len(calls):  # calls are numbered in turn, from 0
            raise UpstreamFailed(f"a tool call numbered {position} after {len(calls)} calls")
        if position == len(calls):
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call, function = calls[position], fragment.get("function") or {}
        call["id"] = fragment.get("id") or call["id"]
        # The name comes whole in the call's first fragment (some servers repeat it).
        call["function"]["name"] = call["function"]["name"] or function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def _answer_as_events(answer: dict[str, Any]) -> Iterator[StreamEvent]:
    """A whole completion as the events of a stream: each choice's message as one delta,
    then each choice's finish reason in a chunk of its own, as OpenAI ends a stream, then
    the usage."""
    deltas, ends = [], []
    for position, choice in enumerate(_answer_choices(answer)):
        message = choice.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content")}
        delta.update({f: message[f] for f in TEXT_FIELDS if f != "content" and message.get(f)})
        if tool_calls := message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        index = choice.get("index", position)
        deltas.append(
            {
                "index": index,
                "delta": delta,
                "logprobs": choice.get("logprobs"),
                "finish_reason": None,
            }
        )
        ends.append(
            {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": choice.get("finish_reason") or "stop",
            }
        )
    fingerprint = answer.get("system_fingerprint")
    yield ChunkEvent(choices=deltas, text=_generated_text(deltas), system_fingerprint=fingerprint)
    yield ChunkEvent(choices=ends, text="", system_fingerprint=fingerprint)
    if usage := _usage(answer.get("usage")):
        yield UsageEvent(usage)


def _upstream_body(request: ChatRequest, upstream: Upstream) -> dict[str, Any]:
    body = {**request.body, "model": upstream.model}
    # The hold covers exactly request.max_tokens output tokens, so the upstream must be
    # capped at that. Reasoning models refuse "max_tokens" and older compatible servers know
    # only "max_tokens": keep the name the customer used unless the channel says otherwise.
    name = upstream.settings.get("max_tokens_param") or (
        "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    )
    body.pop("max_tokens", None)
    body.pop("max_completion_tokens", None)
    body[name] = request.max_tokens
    return body


def _url(upstream: Upstream) -> str:
    return f"{upstream.base_url.rstrip('/')}/chat/completions"


def _headers(upstream: Upstream) -> dict[str, str]:
    # Local servers (vLLM, Ollama, llama.cpp) often take no key: send no header then, since
    # an empty "Bearer " is not a valid header value.
    return {"authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}


def _answer_choices(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole answer's choices, checked (`_choices`); an answer without any is most
    often an error body, whose message is quoted."""
    if "choices" not in answer:
        raise UpstreamFailed(f"an answer without choices: {_http.error_message(answer)}")
    return _choices(answer["choices"], "message")


def _choices(value: object, part: str) -> list[dict[str, Any]]:
    """An answer's or a chunk's choices, checked to be of the shape the gateway reads:
    each a dict with a whole-number index, its `part` (message or delta) a dict, its
    tool calls dicts whose function's name and arguments are text. Anything else is a
    malformed answer, which fails the call as a broken connection does."""
    if not isinstance(value, list) or not all(_readable_choice(c, part) for c in value):
        raise UpstreamFailed(f"malformed choices from the upstream: {str(value)[:300]}")
    return value


def _readable_choice(choice: object, part: str) -> bool:
    if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
        return False
    inner = choice.get(part)
    if inner is None:
        return True
    if not isinstance(inner, dict):
        return False
    calls = inner.get("tool_calls")
    return calls is None or (isinstance(calls, list) and all(map(_readable_tool_call, calls)))


def _readable_tool_call(call: object) -> bool:
    if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
        return False
    function = call.get("function")
    if function is None:
        return True
    return isinstance(function, dict) and all(
        isinstance(function.get(name), str | None) for name in ("name", "arguments")
    )


def _generated_text(choices: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for choice in choices:
        delta = choice.get("delta") or {}
        parts.append(output_text(delta))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if call.get("id"):  # the call's first fragment: its name is output too
                parts.append(function.get("name") or "")
            parts.append(function.get("arguments") or "")
    return "".join(parts)


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None  # absent (or null, as some servers send on every chunk)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage.reported(
        prompt=usage.get("prompt_tokens"),
        completion=usage.get("completion_tokens"),
        # DeepSeek reports its cache hits as prompt_cache_hit_tokens instead, Moonshot's
        # context cache (moonshot-v1) as cached_tokens beside the counts.
        cached=cached or usage.get("prompt_cache_hit_tokens") or usage.get("cached_tokens"),
    )
