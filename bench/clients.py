"""The CPU an HTTP client library costs per upstream request and per streamed chunk.

    .venv/bin/python bench/clients.py     # about half a minute

The gateway spends most of its time calling upstreams; this measures the two libraries it
could call them with (httpx, aiohttp), each in a process of its own, against
bench/upstream.py on 127.0.0.1: the CPU time of the client process per non-streamed call
(16 tokens answered at once) and per stream of 50 tokens sent 1 ms apart (so each chunk is
a read of its own, as in production). Needs httpx, which the dev install has.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import orjson

BENCH = Path(__file__).resolve().parent
CALLS, STREAMS = 3000, 100
BODY = {"model": "bench-t16-p0", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {"model": "bench-t50-p1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
HEADERS = {"content-type": "application/json"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(library: str, url: str) -> tuple[float, float]:
    """Microseconds of CPU per call and per stream, after a warm-up."""
    if library == "httpx":
        import httpx

        client = httpx.AsyncClient()

        async def call() -> None:
            answer = await client.post(url, content=orjson.dumps(BODY), headers=HEADERS)
            orjson.loads(answer.content)

        async def stream() -> None:
            request = client.build_request(
                "POST", url, content=orjson.dumps(STREAM), headers=HEADERS
            )
            answer = await client.send(request, stream=True)
            async for _chunk in answer.aiter_bytes():
                pass
            await answer.aclose()

        close = client.aclose
    else:
        import aiohttp

        session = aiohttp.ClientSession()

        async def call() -> None:
            async with session.post(url, data=orjson.dumps(BODY), headers=HEADERS) as answer:
                orjson.loads(await answer.read())

        async def stream() -> None:
            async with session.post(url, data=orjson.dumps(STREAM), headers=HEADERS) as answer:
                async for _chunk in answer.content.iter_any():
                    pass

        close = session.close
    for _ in range(200):
        await call()
    started = cpu_seconds()
    for _ in range(CALLS):
        await call()
    per_call = (cpu_seconds() - started) / CALLS * 1e6
    started = cpu_seconds()
    for _ in range(STREAMS):
        await stream()
    per_stream = (cpu_seconds() - started) / STREAMS * 1e6
    await close()
    return per_call, per_stream


def main() -> None:
    if len(sys.argv) == 3:  # one library, in a process of its own
        import uvloop

        per_call, per_stream = uvloop.run(measure(sys.argv[1], sys.argv[2]))
        print(f"{per_call:.0f} {per_stream:.0f}")
        return
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(upstream.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print("| client | CPU per call | CPU per stream of 50 chunks | per chunk, beyond a call |")
        print("|---|---:|---:|---:|")
        for library in ("httpx", "aiohttp"):
            out = subprocess.run(
                [sys.executable, __file__, library, url], capture_output=True, text=True, check=True
            ).stdout
            per_call, per_stream = map(float, out.split())
            per_chunk = (per_stream - per_call) / 50
            print(f"| {library} | {per_call:.0f} µs | {per_stream:.0f} µs | {per_chunk:.0f} µs |")
    finally:
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
