"""Real HTTP servers on 127.0.0.1 that stand in for upstream providers.

Each fake is a tiny ASGI app served by uvicorn in a background thread, on a port the
system picks. It answers like the real API (OpenAI's ``/v1/chat/completions`` or
Anthropic's ``/v1/messages``, streamed or not), misbehaves on request, and records what it
received and whether the client went away before the end, so a test can prove that real200
closed the upstream connection and count the tokens sent until then::

    with OpenAIFake(tokens=20, pace=0.05) as fake:
        ...  # point a channel at fake.base_url ("http://127.0.0.1:<port>/v1")
        fake.configure(fail_status=500)  # change the behaviour of the next requests
        call = fake.calls[-1]  # .body, .headers, .tokens_sent, .disconnected_at, ...

A single request can override the server's behaviour with a JSON object of Behaviour
fields in the ``x-fake-behaviour`` header (``{"tokens": 3, "pace": 0.1}``). Nothing here
imports real200: the benchmark uses these servers as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import orjson
import uvicorn

BEHAVIOUR_HEADER = "x-fake-behaviour"

# The answer's text, one token per word, repeated as long as needed.
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


def text_for(tokens: int) -> str:
    """The text a fake sends for ``tokens`` tokens."""
    return "".join(WORDS[i % len(WORDS)] for i in range(tokens))


def _argument_pieces(arguments: dict[str, Any]) -> list[str]:
    """A tool call's JSON arguments, cut into the fragments a stream sends (one token each)."""
    text = orjson.dumps(arguments).decode()
    return [text[i : i + 8] for i in range(0, len(text), 8)]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a fake answers. Set per server (constructor, ``configure``) or per request."""

    tokens: int = 5  # text tokens in the answer, fewer if the request's max_tokens is lower
    tool_call: dict[str, Any] | None = None  # {"name", "arguments": {...}}: one call after the text
    pace: float = 0.0  # seconds before each token (a non-streamed answer waits for all of them)
    stall_after: int | None = None  # streams: after this many tokens, fall silent for `stall`
    stall: float = 0.0  # seconds of that silence, before the next token
    header_delay: float = 0.0  # seconds before the response headers
    fail_status: int | None = None  # answer this status with an error body in the API's shape
    drop_after: int | None = None  # close the connection abruptly after this many tokens
    # (a non-streamed answer: before any response)
    error_after: int | None = None  # streams: send the API's error event after this many tokens
    usage: bool = True  # False: no usage anywhere in the answer
    usage_repeats: int = 1  # streams: send the usage frame this many times
    # Usage reported, in the API's own meaning: OpenAI's prompt_tokens includes cached
    # tokens, Anthropic's input_tokens excludes cache reads and writes.
    prompt_tokens: Any = 10  # an int, or what a buggy server sends instead
    cached_tokens: int = 0  # cache reads: cached_tokens / cache_read_input_tokens
    cache_creation_tokens: int = 0  # Anthropic's cache_creation_input_tokens
    finish_reason: str | None = None  # the API's own finish/stop reason, to override ours
    ignores_stream: bool = False  # answer a streamed request with the whole JSON answer
    always_streams: bool = False  # answer a request that was not streamed with a stream
    reasoning_tokens: int = 0  # OpenAI-compatible: reasoning shown before the answer, as
    # DeepSeek's R1 does (`reasoning_content`), or in `reasoning_field`
    reasoning_field: str = "reasoning_content"
    # Where an OpenAI-compatible server reports its cache reads: OpenAI's
    # prompt_tokens_details.cached_tokens, DeepSeek's prompt_cache_hit_tokens, or
    # cached_tokens beside the counts (Moonshot's context cache)
    cached_field: str = "prompt_tokens_details"


@dataclass(eq=False)
class Call:
    """One request a fake received, and what became of its response."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    behaviour: Behaviour
    received_at: float = field(default_factory=time.monotonic)
    tokens_sent: int = 0
    completed: bool = False  # the whole response was handed to the connection
    disconnected_at: float | None = None  # the client left before the response was complete
    tokens_at_disconnect: int | None = None
    _disconnected: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))

    def wait_disconnected(self, seconds: float = 5.0) -> bool:
        """Block until the client has gone (True) or ``seconds`` have passed (False)."""
        return self._disconnected.wait(seconds)

    async def await_disconnected(self, seconds: float = 5.0) -> bool:
        """``wait_disconnected`` for async code: the event loop keeps running meanwhile."""
        return await asyncio.to_thread(self._disconnected.wait, seconds)

    def _mark_disconnected(self) -> None:
        self.disconnected_at = time.monotonic()
        self.tokens_at_disconnect = self.tokens_sent
        self._disconnected.set()


class _Dropped(Exception):
    """Raised inside the app to make uvicorn close the connection mid-response."""


class _HideDeliberateDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Dropped))


logging.getLogger("uvicorn.error").addFilter(_HideDeliberateDrops())


class FakeUpstream:
    """The server machinery; subclasses speak one API."""

    path: ClassVar[str]

    def __init__(self, **behaviour: Any) -> None:
        self._default = Behaviour(**behaviour)
        self.behaviour = self._default
        self.calls: list[Call] = []
        self._calls_changed = threading.Condition()
        self._ids = itertools.count(1)
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app,
                interface="asgi3",
                lifespan="off",
                log_config=None,  # leave the process's logging alone; errors reach the root logger
                access_log=False,
                timeout_graceful_shutdown=2,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    # --- control, from any thread ------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fake upstream on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Cut every response still running, then shut the server down."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cut_running_responses)
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def configure(self, **changes: Any) -> None:
        """Change how the following requests are answered."""
        self.behaviour = replace(self.behaviour, **changes)

    def reset(self) -> None:
        """Forget the calls, number answers from 1 again, and go back to the behaviour the
        server was created with."""
        self.behaviour = self._default
        self._ids = itertools.count(1)
        with self._calls_changed:
            self.calls.clear()

    def wait_for_calls(self, count: int = 1, seconds: float = 5.0) -> list[Call]:
        """Block until ``count`` calls have arrived; AssertionError after ``seconds``."""
        with self._calls_changed:
            if not self._calls_changed.wait_for(lambda: len(self.calls) >= count, seconds):
                raise AssertionError(f"{len(self.calls)} calls arrived, not {count}")
            return list(self.calls)

    async def await_calls(self, count: int = 1, seconds: float = 5.0) -> list[Call]:
        """``wait_for_calls`` for async code."""
        return await asyncio.to_thread(self.wait_for_calls, count, seconds)

    # --- what a subclass provides -------------------------------------------------------

    def answer(self, call: Call, number: int) -> dict[str, Any]:
        """The whole answer of a non-streamed call."""
        raise NotImplementedError

    def frames(self, call: Call, number: int) -> Iterator[tuple[bytes, bool]]:
        """The SSE frames of a streamed call, each with whether it carries a token."""
        raise NotImplementedError

    def error_body(self, status: int) -> dict[str, Any]:
        raise NotImplementedError

    def error_frame(self) -> bytes:
        raise NotImplementedError

    # --- the ASGI app, on the server's thread -------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._loop = asyncio.get_running_loop()
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != self.path or scope["method"] != "POST":
            await self._send_json(send, 404, {"error": {"message": f"no route {scope['path']}"}})
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        try:
            behaviour = self.behaviour
            if override := headers.get(BEHAVIOUR_HEADER):
                behaviour = replace(behaviour, **orjson.loads(override))
            body = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError) as exc:
            await self._send_json(send, 400, {"error": {"message": f"fake upstream: {exc}"}})
            return
        call = Call(path=scope["path"], headers=headers, body=body, behaviour=behaviour)
        with self._calls_changed:
            self.calls.append(call)
            self._calls_changed.notify_all()
        await self._serve(call, receive, send)

    async def _serve(self, call: Call, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        watcher = asyncio.create_task(self._watch_disconnect(call, receive, task))
        try:
            await self._respond(call, send, next(self._ids))
        except asyncio.CancelledError:
            # Cancelled by the watcher (the client left) or by stop(): end this response
            # quietly; any other cancellation goes on.
            if call.disconnected_at is None and not self._stopping:
                raise
            task.uncancel()
            if self._stopping:
                raise _Dropped from None
        finally:
            watcher.cancel()
            self._handlers.discard(task)

    async def _watch_disconnect(self, call: Call, receive: Any, handler: asyncio.Task) -> None:
        # After the request body, the only message left to receive is the disconnect: of the
        # client, or the formal one that follows a complete response.
        while (await receive())["type"] != "http.disconnect":
            pass
        if not call.completed:
            call._mark_disconnected()
            handler.cancel()

    def _cut_running_responses(self) -> None:
        self._stopping = True
        for task in self._handlers:
            task.cancel()

    async def _respond(self, call: Call, send: Any, number: int) -> None:
        behaviour = call.behaviour
        await asyncio.sleep(behaviour.header_delay)
        if behaviour.fail_status:
            headers = ((b"retry-after", b"1"),) if behaviour.fail_status == 429 else ()
            call.completed = True
            await self._send_json(
                send, behaviour.fail_status, self.error_body(behaviour.fail_status), headers
            )
            return
        if (not call.stream or behaviour.ignores_stream) and not behaviour.always_streams:
            await asyncio.sleep(behaviour.pace * self.answer_tokens(call))
            if behaviour.drop_after is not None:
                raise _Dropped
            call.tokens_sent = self.answer_tokens(call)
            call.completed = True
            await self._send_json(send, 200, self.answer(call, number))
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for frame, is_token in self.frames(call, number):
            if is_token:
                await asyncio.sleep(behaviour.pace)
                if call.tokens_sent == behaviour.stall_after:
                    await asyncio.sleep(behaviour.stall)
                if behaviour.drop_after is not None and call.tokens_sent >= behaviour.drop_after:
                    raise _Dropped
                if behaviour.error_after is not None and call.tokens_sent >= behaviour.error_after:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": self.error_frame(),
                            "more_body": True,
                        }
                    )
                    break
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            if is_token:
                call.tokens_sent += 1
        call.completed = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _send_json(
        send: Any,
        status: int,
        payload: dict[str, Any],
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        body = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # --- helpers for subclasses ---------------------------------------------------------

    @staticmethod
    def text_tokens(call: Call) -> int:
        """Text tokens of the answer: the behaviour's count, capped by the request."""
        body = call.body
        cap = body.get("max_tokens") or body.get("max_completion_tokens")
        return min(call.behaviour.tokens, cap) if cap else call.behaviour.tokens

    def answer_tokens(self, call: Call) -> int:
        tool_call = call.behaviour.tool_call
        arguments = _argument_pieces(tool_call.get("arguments", {})) if tool_call else []
        return call.behaviour.reasoning_tokens + self.text_tokens(call) + len(arguments)

    def is_cut(self, call: Call) -> bool:
        return self.text_tokens(call) < call.behaviour.tokens


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _event(kind: str, **fields: Any) -> bytes:
    """An Anthropic event: its type named twice, in the event line and in the data."""
    return f"event: {kind}\n".encode() + _sse({"type": kind, **fields})


class OpenAIFake(FakeUpstream):
    """``POST /v1/chat/completions``, as OpenAI answers it."""

    path = "/v1/chat/completions"

    def answer(self, call: Call, number: int) -> dict[str, Any]:
        tool_call = call.behaviour.tool_call
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text_for(self.text_tokens(call)) or (None if tool_call else ""),
            "refusal": None,
        }
        if reasoning := call.behaviour.reasoning_tokens:
            message[call.behaviour.reasoning_field] = text_for(reasoning)
        if tool_call:
            message["tool_calls"] = [
                {
                    "id": f"call_fake{number}",
                    "type": "function",
                    "function": {
                        "name": tool_call["name"],
                        "arguments": orjson.dumps(tool_call.get("arguments", {})).decode(),
                    },
                }
            ]
        answer = {
            "id": f"chatcmpl-fake{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.body.get("model"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": self._finish_reason(call),
                    "logprobs": None,
                }
            ],
        }
        if call.behaviour.usage:
            answer["usage"] = self._usage(call)
        return answer

    def frames(self, call: Call, number: int) -> Iterator[tuple[bytes, bool]]:
        created = int(time.time())

        def frame(
            delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any
        ) -> bytes:
            choices = (
                []
                if delta is None
                else [
                    {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
                ]
            )
            chunk = {
                "id": f"chatcmpl-fake{number}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": call.body.get("model"),
                "system_fingerprint": "fp_fake",
                "choices": choices,
                **extra,
            }
            return _sse(chunk)

        yield frame({"role": "assistant", "content": "", "refusal": None}), False
        for i in range(call.behaviour.reasoning_tokens):
            yield frame({call.behaviour.reasoning_field: WORDS[i % len(WORDS)]}), True
        for i in range(self.text_tokens(call)):
            yield frame({"content": WORDS[i % len(WORDS)]}), True
        if tool_call := call.behaviour.tool_call:
            opening = {
                "index": 0,
                "id": f"call_fake{number}",
                "type": "function",
                "function": {"name": tool_call["name"], "arguments": ""},
            }
            yield frame({"tool_calls": [opening]}), False
            for piece in _argument_pieces(tool_call.get("arguments", {})):
                yield frame({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}), True
        yield frame({}, self._finish_reason(call)), False
        include_usage = (call.body.get("stream_options") or {}).get("include_usage")
        if include_usage and call.behaviour.usage:
            for _ in range(call.behaviour.usage_repeats):
                yield frame(None, usage=self._usage(call)), False
        yield b"data: [DONE]\n\n", False

    def error_body(self, status: int) -> dict[str, Any]:
        kind = {429: "rate_limit_exceeded"}.get(status) or (
            "server_error" if status >= 500 else "invalid_request_error"
        )
        return {
            "error": {
                "message": f"fake upstream failure ({status})",
                "type": kind,
                "param": None,
                "code": None,
            }
        }

    def error_frame(self) -> bytes:
        return _sse(
            {
                "error": {
                    "message": "fake failure mid-stream",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )

    def _finish_reason(self, call: Call) -> str:
        if call.behaviour.finish_reason:
            return call.behaviour.finish_reason
        if self.is_cut(call):
            return "length"
        return "tool_calls" if call.behaviour.tool_call else "stop"

    def _usage(self, call: Call) -> dict[str, Any]:
        behaviour = call.behaviour
        completion = self.answer_tokens(call)
        return {
            "prompt_tokens": behaviour.prompt_tokens,
            "completion_tokens": completion,
            # A buggy server's prompt count (None, a string) makes no total either.
            "total_tokens": (
                behaviour.prompt_tokens + completion
                if isinstance(behaviour.prompt_tokens, int)
                else None
            ),
            **(
                {"prompt_tokens_details": {"cached_tokens": behaviour.cached_tokens}}
                if behaviour.cached_field == "prompt_tokens_details"
                else {behaviour.cached_field: behaviour.cached_tokens}
            ),
        }


class AnthropicFake(FakeUpstream):
    """``POST /v1/messages``, as Anthropic answers it."""

    path = "/v1/messages"

    _ERROR_TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }

    def answer(self, call: Call, number: int) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.text_tokens(call):
            content.append({"type": "text", "text": text_for(self.text_tokens(call))})
        if tool_call := call.behaviour.tool_call:
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{number}",
                    "name": tool_call["name"],
                    "input": tool_call.get("arguments", {}),
                }
            )
        answer = {
            "id": f"msg_fake{number}",
            "type": "message",
            "role": "assistant",
            "model": call.body.get("model"),
            "content": content,
            "stop_reason": self._stop_reason(call),
            "stop_sequence": None,
        }
        if call.behaviour.usage:
            answer["usage"] = {**self._input_usage(call), "output_tokens": self.answer_tokens(call)}
        return answer

    def frames(self, call: Call, number: int) -> Iterator[tuple[bytes, bool]]:
        behaviour = call.behaviour
        message = {
            "id": f"msg_fake{number}",
            "type": "message",
            "role": "assistant",
            "model": call.body.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if behaviour.usage:
            # Like Anthropic, count one output token already: a client that adds the
            # message_delta's running total to it would be off by one.
            message["usage"] = {**self._input_usage(call), "output_tokens": 1}
        yield _event("message_start", message=message), False
        yield _event("ping"), False
        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []  # (block, its deltas)
        if self.text_tokens(call):
            words = [WORDS[i % len(WORDS)] for i in range(self.text_tokens(call))]
            deltas = [{"type": "text_delta", "text": word} for word in words]
            blocks.append(({"type": "text", "text": ""}, deltas))
        if tool_call := behaviour.tool_call:
            pieces = _argument_pieces(tool_call.get("arguments", {}))
            deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
            block = {"type": "tool_use", "id": f"toolu_fake{number}", "name": tool_call["name"]}
            blocks.append(({**block, "input": {}}, deltas))
        for index, (block, deltas) in enumerate(blocks):
            yield _event("content_block_start", index=index, content_block=block), False
            for delta in deltas:
                yield _event("content_block_delta", index=index, delta=delta), True
            yield _event("content_block_stop", index=index), False
        # Anthropic may send several message_delta events; each usage is a running total, and
        # only the last one says why the message stopped.
        repeats = behaviour.usage_repeats if behaviour.usage else 1
        for remaining in range(repeats - 1, -1, -1):
            stop_reason = None if remaining else self._stop_reason(call)
            usage = (
                {"usage": {"output_tokens": self.answer_tokens(call)}} if behaviour.usage else {}
            )
            delta = {"stop_reason": stop_reason, "stop_sequence": None}
            yield _event("message_delta", delta=delta, **usage), False
        yield _event("message_stop"), False

    def error_body(self, status: int) -> dict[str, Any]:
        kind = self._ERROR_TYPES.get(status, "api_error")
        return {
            "type": "error",
            "error": {"type": kind, "message": f"fake upstream failure ({status})"},
        }

    def error_frame(self) -> bytes:
        return _event("error", error={"type": "overloaded_error", "message": "Overloaded"})

    def _stop_reason(self, call: Call) -> str:
        if call.behaviour.finish_reason:
            return call.behaviour.finish_reason
        if self.is_cut(call):
            return "max_tokens"
        return "tool_use" if call.behaviour.tool_call else "end_turn"

    @staticmethod
    def _input_usage(call: Call) -> dict[str, int]:
        behaviour = call.behaviour
        return {
            "input_tokens": behaviour.prompt_tokens,
            "cache_read_input_tokens": behaviour.cached_tokens,
            "cache_creation_input_tokens": behaviour.cache_creation_tokens,
        }
