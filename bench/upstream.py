"""A fast fake OpenAI-compatible upstream for the benchmark, in its own process.

A raw ASGI app on uvicorn (uvloop + httptools), so the upstream costs as little CPU as
possible and never shares a GIL with real200 or the load generator. It answers
``POST /v1/chat/completions`` like OpenAI (streamed or not, with usage), and the model name
says how: ``bench-t<tokens>-p<milliseconds per token>``, e.g. ``bench-t50-p20`` streams 50
tokens, one every 20 ms (a non-streamed answer waits tokens x pace, then answers at once).
real200's channel maps each customer model to the same upstream name, so the direct and
the relayed runs ask for exactly the same answer. ``max_tokens`` caps the tokens.

    .venv/bin/python bench/upstream.py --port 0   # prints "ready <port>" once it listens
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
import time
from functools import cache

import orjson
import uvicorn
import uvloop

PATH = "/v1/chat/completions"
MODEL_SHAPE = re.compile(r"^bench-t(\d+)-p(\d+)$")
WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
PROMPT_TOKENS = 12
CREATED = int(time.time())
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def behaviour(model: str, max_tokens: int | None) -> tuple[int, float]:
    match = MODEL_SHAPE.match(model or "")
    tokens, pace_ms = (int(match[1]), int(match[2])) if match else (16, 0)
    if max_tokens:
        tokens = min(tokens, max_tokens)
    return tokens, pace_ms / 1000


def _usage(tokens: int) -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


@cache
def completion(model: str, tokens: int) -> bytes:
    text = "".join(WORDS[i % len(WORDS)] for i in range(tokens))
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(tokens),
        }
    )


@cache
def frames(model: str, tokens: int, include_usage: bool) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """The opening frame (role), one frame per token, and everything after the last token."""

    def frame(delta: dict | None, finish_reason: str | None = None, **extra: object) -> bytes:
        choices = (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    opening = frame({"role": "assistant", "content": "", "refusal": None})
    per_token = tuple(frame({"content": WORDS[i % len(WORDS)]}) for i in range(tokens))
    closing = frame({}, "stop")
    if include_usage:
        closing += frame(None, usage=_usage(tokens))
    return opening, per_token, closing + b"data: [DONE]\n\n"


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] != PATH or scope["method"] != "POST":
        answer = b'{"error":{"message":"no route"}}'
        headers = [*JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return
    request = orjson.loads(body)
    model = request.get("model") or ""
    tokens, pace = behaviour(
        model, request.get("max_tokens") or request.get("max_completion_tokens")
    )
    if not request.get("stream"):
        if pace:
            await asyncio.sleep(pace * tokens)
        answer = completion(model, tokens)
        headers = [*JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    opening, per_token, closing = frames(model, tokens, include_usage)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": opening, "more_body": True})
    # Tokens on a fixed schedule from the start, so an upstream that is late once does not
    # slow the whole stream down.
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i, frame in enumerate(per_token):
        delay = started + (i + 1) * pace - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": closing, "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        interface="asgi3",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print(f"ready {sock.getsockname()[1]}", flush=True)
        await task

    uvloop.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
