"""What the HTTP adapters share: the request with its per-phase timeouts, the mapping of
HTTP and transport failures onto base.py's error classes, and an incremental SSE reader.

The client is aiohttp: its C parser and lean connection pool cost about a third of
httpx's CPU per request and per streamed chunk (bench/README.md), which is most of what a
relay does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
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
    client: aiohttp.ClientSession,
    upstream: Upstream,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST ``body`` as JSON and yield the response as soon as its headers are in, body
    unread; a status other than 2xx raises instead.

    Before the headers, the socket's read timeout is the first-byte timeout; after them it
    becomes the chunk timeout, so every later read of the body is bounded by that (a
    stream read with ``sse_data`` keeps that timeout its own, cheaper way). Failures
    before the headers raise UpstreamUnavailable, failures while the body is read (inside
    the ``async with``) UpstreamFailed. Leaving the block before the body's end closes the
    connection: that is how the upstream learns at once that nobody is listening any more.
    """
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=upstream.connect_timeout,
        sock_connect=upstream.connect_timeout,
        sock_read=upstream.first_byte_timeout,
    )
    try:
        response = await client.post(
            url,
            data=orjson.dumps(body),
            headers={"content-type": "application/json", **headers},
            timeout=timeout,
            allow_redirects=False,
        )
    except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors too
        raise UpstreamUnavailable(f"{_describe(exc)} before the response", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"{_describe(exc)} before the response") from exc
    try:
        if not 200 <= response.status < 300:
            await _raise_for_status(response)
        if response.connection is not None:
            response.connection.protocol.read_timeout = upstream.chunk_timeout
            response.connection.protocol.start_timeout()
        try:
            yield response
        except TimeoutError as exc:
            raise UpstreamFailed(f"{_describe(exc)} while reading", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"{_describe(exc)} while reading") from exc
    finally:
        if response.content.at_eof():
            response.release()  # read to its end: the connection goes back to the pool
        else:
            response.close()


async def read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The whole body of a non-streamed answer, parsed."""
    return parse_json(await response.read())


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


async def sse_data(response: aiohttp.ClientResponse, chunk_timeout: float) -> AsyncIterator[bytes]:
    """Yield the data of each server-sent event as soon as the blank line ending it arrives.
    A read that waits more than ``chunk_timeout`` seconds for the next bytes fails with a
    TimeoutError (which ``post`` turns into UpstreamFailed).

    Only ``data`` fields matter to us: OpenAI sends nothing else, and Anthropic repeats each
    event's name inside its data, so ``event``, ``id`` and comment lines are skipped.
    """
    events = SseEvents()
    watch = _IdleWatch(response, chunk_timeout)
    try:
        while True:
            watch.waiting_since = watch.loop.time()
            chunk = await response.content.readany()
            watch.waiting_since = None
            if not chunk:
                break
            for data in events.feed(chunk):
                yield data
    finally:
        watch.stop()
    # Be lenient with an upstream whose last event lacks its blank line.
    if (data := events.end()) is not None:
        yield data


class _IdleWatch:
    """The between-chunks timeout of a stream, in place of aiohttp's read timeout.

    aiohttp re-arms a timer on every read of the socket (a cancel and a heap push, 3 % of
    the CPU of relaying a chunk). This one only notes when each read starts to wait, and
    wakes up once per timeout to look: a read that has waited the whole timeout fails.
    Only the wait of a read counts: a relay that waits to write to a slow client reads
    nothing meanwhile, and that is not the upstream falling silent.
    """

    def __init__(self, response: aiohttp.ClientResponse, timeout: float) -> None:
        if response.connection is not None:
            response.connection.protocol.read_timeout = None
            response.connection.protocol.start_timeout()  # cancels aiohttp's own timer
        self.loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None  # when the pending read began, if any
        self._content = response.content
        self._timeout = timeout
        self._timer = self.loop.call_at(self.loop.time() + timeout, self._look)

    def _look(self) -> None:
        now = self.loop.time()
        if self.waiting_since is None:  # no read pending: look again a timeout from now
            self._timer = self.loop.call_at(now + self._timeout, self._look)
        elif now < (due := self.waiting_since + self._timeout):
            self._timer = self.loop.call_at(due, self._look)
        else:
            idle = aiohttp.SocketTimeoutError(f"no data for {self._timeout:g} s")
            self._content.set_exception(idle)

    def stop(self) -> None:
        self._timer.cancel()


class SseEvents:
    """The data of server-sent events, from bytes that arrive in pieces of any size.

    An event ends with a blank line. Nearly every event is one ``data: {...}`` line, taken
    whole; any other is read line by line: several data lines are joined by newlines,
    ``event``, ``id``, ``retry`` and comment lines are skipped. Lines may end with CRLF.
    """

    def __init__(self) -> None:
        self._pending = b""  # the start of an event whose blank line has not arrived

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event this chunk completes."""
        buffer = self._pending + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *blocks, self._pending = buffer.split(b"\n\n")
        return [data for block in blocks if (data := _event_data(block)) is not None]

    def end(self) -> bytes | None:
        """The data of an event the stream ended without completing."""
        block, self._pending = self._pending, b""
        return _event_data(block)


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]
    lines = [line for line in block.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    try:
        raw = await response.read()
    except (aiohttp.ClientError, TimeoutError):  # the status says enough on its own
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


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _quote(data: bytes) -> str:
    return data[:_MAX_DETAIL].decode(errors="replace")
