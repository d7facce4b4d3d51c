"""What the HTTP adapters share: the request with its per-phase timeouts, the mapping of
HTTP and transport failures onto base.py's error classes, and an incremental SSE reader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from apps.gateway.providers.base import (
    Upstream,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnavailable,
)

# 4xx statuses that say the channel is at fault, not the request: our upstream key is
# wrong or lacks access (401, 403), the mapped model or base URL does not exist there (404),
# the upstream gave up waiting (408) or is rate limiting us (429). Another channel may
# succeed, and the customer must not see (part of) our upstream key in a 401 message.
_CHANNEL_FAULTS = frozenset({401, 403, 404, 408, 429})
_MAX_DETAIL = 300  # characters of an upstream error quoted in our exception messages


@asynccontextmanager
async def post(
    client: httpx.AsyncClient,
    upstream: Upstream,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> AsyncIterator[httpx.Response]:
    """POST ``body`` as JSON and yield the response as soon as its headers are in, body
    unread; a status other than 2xx raises instead.

    Before the headers, httpx's read timeout is the first-byte timeout; after them it
    becomes the chunk timeout, so every later read of the body is bounded by that. Failures
    before the headers raise UpstreamUnavailable, failures while the body is read (inside
    the ``async with``) UpstreamFailed. Leaving the block closes the response, and a response
    closed before its end closes its connection: that is how the upstream learns at once that
    nobody is listening any more.
    """
    request = client.build_request(
        "POST",
        url,
        content=orjson.dumps(body),
        headers={"content-type": "application/json", **headers},
        timeout=httpx.Timeout(
            connect=upstream.connect_timeout,
            read=upstream.first_byte_timeout,
            write=upstream.chunk_timeout,
            pool=upstream.connect_timeout,
        ),
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(f"{_describe(exc)} before the response", timeout=True) from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(f"{_describe(exc)} before the response") from exc
    try:
        if not response.is_success:
            await _raise_for_status(response)
        # httpcore reads the request's timeout extension when it starts reading the body,
        # so changing it here bounds each read between chunks by the chunk timeout.
        request.extensions["timeout"]["read"] = upstream.chunk_timeout
        try:
            yield response
        except httpx.TimeoutException as exc:
            raise UpstreamFailed(f"{_describe(exc)} while reading", timeout=True) from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"{_describe(exc)} while reading") from exc
    finally:
        await response.aclose()


async def read_json(response: httpx.Response) -> dict[str, Any]:
    """The whole body of a non-streamed answer, parsed."""
    return parse_json(await response.aread())


def parse_json(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamFailed(f"malformed JSON from the upstream: {_quote(data)}") from exc
    if not isinstance(value, dict):
        raise UpstreamFailed(f"unexpected JSON from the upstream: {_quote(data)}")
    return value


def error_message(payload: dict[str, Any]) -> str:
    """The message of an error object, as OpenAI (``{"error": {"message"}}``), Anthropic
    (``{"type": "error", "error": {"message"}}``) and most compatible servers spell it."""
    error = _error_object(payload)
    return str(error.get("message") or _quote(orjson.dumps(payload)))


async def sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield the data of each server-sent event as soon as the blank line ending it arrives.

    Only ``data`` fields matter to us: OpenAI sends nothing else, and Anthropic repeats each
    event's name inside its data, so ``event``, ``id`` and comment lines are skipped.
    """
    event = _EventBuilder()
    pending = b""
    async for chunk in response.aiter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if (data := event.feed(line)) is not None:
                yield data
    # Be lenient with an upstream whose last event lacks its final newline or blank line.
    for line in (pending, b""):
        if (data := event.feed(line)) is not None:
            yield data


class _EventBuilder:
    def __init__(self) -> None:
        self._data: list[bytes] = []

    def feed(self, line: bytes) -> bytes | None:
        """Take one line; return the event's data when this line completes one."""
        line = line.removesuffix(b"\r")
        if line.startswith(b"data:"):
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            return None
        if line or not self._data:
            return None
        data, self._data = b"\n".join(self._data), []
        return data


async def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    try:
        raw = await response.aread()
    except httpx.HTTPError:  # the status says enough on its own
        raw = b""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"error": {"message": raw.decode(errors="replace")[:_MAX_DETAIL]}}
    message = f"the upstream answered {status}: {error_message(payload)[:_MAX_DETAIL]}"
    if 400 <= status < 500 and status not in _CHANNEL_FAULTS:
        raise UpstreamRejected(message, status=status, body=_openai_error_body(payload))
    raise UpstreamUnavailable(message, status=status)


def _openai_error_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The upstream's error in OpenAI's shape, whatever shape it came in."""
    error = _error_object(payload)
    return {
        "error": {
            "message": error_message(payload),
            "type": error.get("type") or "invalid_request_error",
            "param": error.get("param"),
            "code": error.get("code"),
        }
    }


def _error_object(payload: dict[str, Any]) -> dict[str, Any]:
    # vLLM puts the fields at the top level; Ollama sends {"error": "a sentence"}.
    error = payload.get("error", payload)
    if isinstance(error, str):
        return {"message": error}
    return error if isinstance(error, dict) else {}


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _quote(data: bytes) -> str:
    return data[:_MAX_DETAIL].decode(errors="replace")
