"""The benchmark's load generator: one process per scenario, started by bench/run.py.

A minimal HTTP/1.1 client on raw asyncio protocols under uvloop (no httpx, no h11), so
that the load generator costs little CPU next to what it measures: keep-alive connections,
one request at a time on each, Content-Length and chunked bodies, server-sent events
counted as they arrive.

It takes one JSON spec as its argument and speaks JSON lines on stdout. With
``"handshake": true`` it prints ``{"event": "ready"}`` and waits for a line on stdin before
the load starts, and ``{"event": "finished"}`` (waiting again) once every request has
ended, so the runner can read the server's CPU and memory exactly around the load. In
``hold`` mode it prints ``{"event": "open", "open": n}`` a few times a second. The last
line is ``{"event": "result", ...}``.

Modes:
  loop  ``concurrency`` connections, each sending requests back to back until
        ``duration`` seconds have passed or ``max_requests`` requests were sent; their
        first requests go out together, or spread evenly over ``spread`` seconds;
  hold  ``concurrency`` requests (streams), one per connection, all sent within ``ramp``
        seconds (default 1), each held to its end.
Everything stops by ``deadline`` seconds after the start, whatever the server does.
"""

from __future__ import annotations

import asyncio
import math
import resource
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

HEAD, SIZE, DATA, CRLF, TRAILER, FIXED, UNTIL_CLOSE, DONE = range(8)
TOKEN_MARK = b'{"content":"'  # a delta that carries text (the opening role delta has none)


class Exchange:
    """One request and its response, parsed as the bytes arrive."""

    __slots__ = (
        "body",
        "buf",
        "count_open",
        "counted",
        "done",
        "error",
        "future",
        "keep_alive",
        "last_event",
        "load",
        "max_gap",
        "pending",
        "remaining",
        "sse",
        "state",
        "status",
        "t_end",
        "t_first",
        "t_headers",
        "t_start",
        "tokens",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, load: Load, count_open: bool = False):
        self.future: asyncio.Future[Exchange] = loop.create_future()
        self.sse = load.sse
        self.load = load
        self.count_open = count_open  # count this exchange open from its headers to its end
        self.counted = False
        self.t_start = time.monotonic()
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.status = 0
        self.tokens = 0
        self.done = False  # [DONE] seen (streams)
        self.error: str | None = None
        self.keep_alive = True
        self.last_event: float | None = None
        self.max_gap = 0.0
        self.state = HEAD
        self.remaining = 0
        self.buf = bytearray()
        self.pending = b""
        self.body = bytearray()

    @property
    def ok(self) -> bool:
        if self.error is not None or self.status != 200 or self.t_end is None:
            return False
        if self.sse:
            return self.done
        return self.load.expect in self.body

    def fail(self, reason: str) -> None:
        if not self.future.done():
            self.error = reason
            self.keep_alive = False
            self._uncount()
            self.future.set_result(self)

    def _finish(self, now: float) -> None:
        self.state = DONE
        self.t_end = now
        if not self.future.done():
            self._uncount()
            self.future.set_result(self)

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.load.open -= 1

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        while True:
            state = self.state
            if state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(buf[:end]).decode("latin-1"), now)
                del buf[: end + 4]
            elif state == SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                self.state, self.remaining = (TRAILER, 0) if size == 0 else (DATA, size)
            elif state in (DATA, FIXED):
                if state == FIXED and self.remaining == 0:
                    self._finish(now)
                    return
                if not buf:
                    return
                take = min(len(buf), self.remaining)
                self._body(bytes(buf[:take]), now)
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0 and state == DATA:
                    self.state = CRLF
            elif state == CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = SIZE
            elif state == TRAILER:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[: end + 4]
                self._finish(now)
                return
            elif state == UNTIL_CLOSE:
                if buf:
                    self._body(bytes(buf), now)
                    buf.clear()
                return
            else:
                return

    def _head(self, head: str, now: float) -> None:
        lines = head.split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.t_headers = now
        if self.count_open and self.status == 200:
            self.counted = True
            self.load.open += 1
            self.load.max_open = max(self.load.max_open, self.load.open)
        length, chunked = None, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection" and "close" in value.lower():
                self.keep_alive = False
        if chunked:
            self.state = SIZE
        elif length is not None:
            self.state, self.remaining = FIXED, length
        else:
            self.state, self.keep_alive = UNTIL_CLOSE, False

    def _body(self, data: bytes, now: float) -> None:
        if not self.sse:
            self.body += data
            return
        *events, self.pending = (self.pending + data).split(b"\n\n")
        for event in events:
            if self.last_event is not None:
                self.max_gap = max(self.max_gap, now - self.last_event)
            self.last_event = now
            if TOKEN_MARK in event:
                self.tokens += 1
                if now <= self.load.window_end:
                    self.load.window_tokens += 1
                if self.t_first is None:
                    self.t_first = now
            elif event == b"data: [DONE]":
                self.done = True
            elif event.startswith(b'data: {"error"'):
                self.error = "error event"

    def closed(self) -> None:
        if self.state == UNTIL_CLOSE:
            self._finish(time.monotonic())
        else:
            self.fail("connection closed")


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.is_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if self.exchange is not None and not self.exchange.future.done():
            self.exchange.closed()

    def send(self, exchange: Exchange, payload: bytes) -> None:
        self.exchange = exchange
        assert self.transport is not None
        self.transport.write(payload)

    def close(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.close()
        self.is_closed = True


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


async def wait_for_go(handshake: bool) -> None:
    if handshake:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("the runner went away")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        url = urlsplit(spec["url"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        body = {
            "model": spec["model"],
            "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
            "max_tokens": spec["max_tokens"],
        }
        self.sse = bool(spec.get("stream"))
        self.expect = spec.get("expect", '"choices"').encode()  # in every good answer
        self.expect_tokens = spec.get("expect_tokens", spec["max_tokens"])
        if self.sse:
            body["stream"] = True
        method = spec.get("method", "POST")
        content = orjson.dumps(body) if method == "POST" else b""
        head = [
            f"{method} {url.path} HTTP/1.1",
            f"Host: {url.netloc}",
            "Content-Type: application/json",
            "Accept: */*",
            f"Content-Length: {len(content)}",
        ]
        # One request per key, so that the load can be spread over several organizations:
        # connection i sends with key i modulo their number.
        keys = spec.get("api_keys") or [spec.get("api_key")]
        self.payloads = []
        for key in keys:
            lines = [*head, f"Authorization: Bearer {key}"] if key else head
            self.payloads.append(("\r\n".join(lines) + "\r\n\r\n").encode() + content)
        self.results: list[Exchange] = []
        self.in_flight: set[Exchange] = set()
        self.connections: list[Connection] = []
        self.issued = 0
        self.open = 0
        self.max_open = 0
        self.connect_errors = 0
        self.window_end = math.inf  # tokens that arrive by then count for the token rate
        self.window_tokens = 0

    def payload(self, worker: int) -> bytes:
        return self.payloads[worker % len(self.payloads)]

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _transport, connection = await loop.create_connection(Connection, self.host, self.port)
        self.connections.append(connection)
        return connection

    async def one(self, connection: Connection, payload: bytes) -> Exchange:
        exchange = Exchange(asyncio.get_running_loop(), self)
        self.in_flight.add(exchange)
        connection.send(exchange, payload)
        result = await exchange.future
        self.in_flight.discard(exchange)
        self.results.append(result)
        return result

    async def stream_held(
        self, connection: Connection | None, payload: bytes, delay: float = 0.0
    ) -> None:
        """One request that counts itself open between its headers and its end."""
        await asyncio.sleep(delay)
        try:
            connection = connection or await self.connect()
        except OSError:
            self.connect_errors += 1
            return
        exchange = Exchange(asyncio.get_running_loop(), self, count_open=True)
        self.in_flight.add(exchange)
        connection.send(exchange, payload)
        await exchange.future
        self.in_flight.discard(exchange)
        self.results.append(exchange)
        connection.close()

    async def loop_worker(
        self, connection: Connection | None, payload: bytes, stop_at: float, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        limit = self.spec.get("max_requests")
        while time.monotonic() < stop_at and (limit is None or self.issued < limit):
            self.issued += 1
            if connection is None or connection.is_closed:
                try:
                    connection = await self.connect()
                except OSError:
                    self.connect_errors += 1
                    await asyncio.sleep(0.05)
                    continue
            exchange = await self.one(connection, payload)
            if not exchange.keep_alive or exchange.state != DONE:
                connection.close()
                connection = None

    async def reporter(self) -> None:
        while True:
            emit("open", open=self.open, max_open=self.max_open, done=len(self.results))
            await asyncio.sleep(0.25)

    async def run(self) -> None:
        spec = self.spec
        concurrency = spec["concurrency"]
        mode = spec.get("mode", "loop")
        connections: list[Connection | None] = [None] * concurrency
        if mode == "loop":
            # Connect before the clock starts, one at a time and a little apart: connections
            # that all arrive at once tend to be accepted by a single server worker, which
            # would then carry the whole load (with many real clients they spread).
            connections = []
            for _ in range(concurrency):
                connections.append(await self.connect())
                await asyncio.sleep(spec.get("connect_gap", 0.005))
        emit("ready")
        await wait_for_go(spec.get("handshake", False))
        cpu_before = cpu_seconds()
        started = time.monotonic()
        hard_stop = started + spec["deadline"]
        if mode == "loop":
            stop_at = self.window_end = started + spec["duration"]
            gap = spec.get("spread", 0.0) / concurrency
            workers = [
                self.loop_worker(c, self.payload(i), stop_at, i * gap)
                for i, c in enumerate(connections)
            ]
            reporter = None
        else:
            # All sent within `ramp` seconds (like many clients arriving together, and so
            # that both server workers get their share), then held to their end.
            gap = spec.get("ramp", 1.0) / concurrency
            workers = [
                self.stream_held(c, self.payload(i), i * gap) for i, c in enumerate(connections)
            ]
            reporter = asyncio.create_task(self.reporter())
        tasks = [asyncio.create_task(w) for w in workers]
        _done, pending = await asyncio.wait(tasks, timeout=max(hard_stop - time.monotonic(), 0))
        timed_out = len(self.in_flight)
        for exchange in list(self.in_flight):  # past the deadline: stop waiting
            exchange.fail("deadline")
        if pending:
            await asyncio.wait(pending, timeout=5)
        for task in pending:
            task.cancel()
        if reporter is not None:
            reporter.cancel()
        finished = time.monotonic()
        cpu_after = cpu_seconds()
        for connection in self.connections:
            connection.close()
        emit("finished")
        await wait_for_go(spec.get("handshake", False))
        emit("result", **self.summary(started, finished, cpu_after - cpu_before, timed_out))

    def summary(self, started: float, finished: float, cpu: float, timed_out: int) -> dict:
        ok = [e for e in self.results if e.ok]
        errors = Counter()
        for e in self.results:
            if not e.ok:
                errors[e.error or (f"status {e.status}" if e.status != 200 else "incomplete")] += 1
        if self.connect_errors:
            errors["connect"] += self.connect_errors
        ends = [e.t_end for e in ok if e.t_end is not None]
        wall = (max(ends) - started) if ends else (finished - started)
        latencies = [e.t_end - e.t_start for e in ok]
        summary: dict[str, Any] = {
            "requests": len(self.results) + self.connect_errors,
            "ok": len(ok),
            "status_200": sum(1 for e in self.results if e.status == 200),
            "errors": dict(errors),
            "timed_out": timed_out,
            "wall_s": round(wall, 3),
            "rate": round(len(ok) / wall, 2) if wall > 0 else None,
            "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)),
            "max_ms": ms(max(latencies) if latencies else None),
            "loadgen_cpu_s": round(cpu, 3),
        }
        if self.sse:
            ttft = [e.t_first - e.t_start for e in ok if e.t_first is not None]
            gaps = [e.max_gap for e in self.results]
            stall_gap = self.spec.get("stall_gap", 2.0)
            tokens = sum(e.tokens for e in ok)
            summary.update(
                tokens=tokens,
                token_rate=round(tokens / wall, 1) if wall > 0 else None,
                window_token_rate=(
                    round(self.window_tokens / self.spec["duration"], 1)
                    if self.spec.get("mode", "loop") == "loop"
                    else None
                ),
                ttft_p50_ms=ms(percentile(ttft, 50)),
                ttft_p99_ms=ms(percentile(ttft, 99)),
                short_streams=sum(1 for e in ok if e.tokens != self.expect_tokens),
                stalled=sum(
                    1 for e in self.results if e.max_gap > stall_gap or e.error == "deadline"
                ),
                max_gap_ms=ms(max(gaps) if gaps else None),
                gap_p99_ms=ms(percentile(gaps, 99)),
                max_open=self.max_open,
            )
        return summary


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    uvloop.run(Load(spec).run())


if __name__ == "__main__":
    main()
