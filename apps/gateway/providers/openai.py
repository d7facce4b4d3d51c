"""Any OpenAI-compatible upstream (OpenAI, DeepSeek, vLLM, Ollama, OpenRouter…).

The request is passed through as the customer sent it, with the upstream's model name, the
resolved output cap, and a request for usage at the end of a stream. The answer's
``choices`` come back as they were sent (a server that answers a streamed request with
the whole completion has it relayed as a stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

from apps.gateway.providers import _http
from apps.gateway.providers.base import (
    ChatRequest,
    ChunkEvent,
    Completion,
    StreamEvent,
    Upstream,
    UpstreamFailed,
    Usage,
    UsageEvent,
)


class OpenAIProvider:
    async def complete(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> Completion:
        body = _upstream_body(request, upstream)
        body.pop("stream", None)
        body.pop("stream_options", None)  # OpenAI refuses stream_options without stream
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            answer = await _http.read_json(r)
        if "choices" not in answer:
            raise UpstreamFailed(f"an answer without choices: {_http.error_message(answer)}")
        response = {"choices": answer["choices"]}
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
        finished = False
        async with _http.post(client, upstream, _url(upstream), body, _headers(upstream)) as r:
            if r.content_type == "application/json":
                # A server that ignores `stream` answers the whole completion at once; it
                # bills the answer, so the customer gets it, as a stream.
                for event in _answer_as_events(await _http.read_json(r)):
                    yield event
                return
            async for data in _http.sse_data(r, upstream.chunk_timeout):
                if data == b"[DONE]":
                    return
                chunk = _http.parse_json(data)
                if chunk.get("error"):  # how OpenRouter and vLLM report a failure mid-stream
                    raise UpstreamFailed(f"error event: {_http.error_message(chunk)}")
                if choices := chunk.get("choices"):
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


def _answer_as_events(answer: dict[str, Any]) -> Iterator[StreamEvent]:
    """A whole completion as the events of a stream: each choice's message as one delta,
    then each choice's finish reason in a chunk of its own, as OpenAI ends a stream, then
    the usage."""
    if "choices" not in answer:
        raise UpstreamFailed(f"an answer without choices: {_http.error_message(answer)}")
    deltas, ends = [], []
    for position, choice in enumerate(answer["choices"]):
        message = choice.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content")}
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
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


def _generated_text(choices: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for choice in choices:
        delta = choice.get("delta") or {}
        parts.append(delta.get("content") or "")
        parts.append(delta.get("refusal") or "")
        for call in delta.get("tool_calls") or ():
            parts.append((call.get("function") or {}).get("arguments") or "")
    return "".join(parts)


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None  # absent (or null, as some servers send on every chunk)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage.reported(
        prompt=usage.get("prompt_tokens"),
        completion=usage.get("completion_tokens"),
        # DeepSeek reports its cache hits as prompt_cache_hit_tokens instead.
        cached=cached or usage.get("prompt_cache_hit_tokens"),
    )
