"""real200's benchmark (issue 3): the same load sent to a fake upstream directly and
through real200, side by side, on this machine.

    .venv/bin/python bench/run.py            # about three minutes; see bench/README.md

It starts a fake OpenAI upstream (bench/upstream.py) in its own process, recreates the
PostgreSQL database ``real200_bench`` and flushes Redis database 15, sets real200 up with
its own management commands, starts it as ``make serve`` does (platform/serve, two
workers), and runs each scenario with a fresh load-generator process (bench/loadgen.py).
The CPU and memory of every process it started are read from /proc around each
scenario. It ends with the books (``manage.py reconcile``) and a count of usage records,
prints a markdown report and writes it to bench/results/<date>.md. Every process it
started is stopped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PYTHON = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CHAT_PATH = "/v1/chat/completions"
NONE = "-"  # a figure that could not be measured

FAST_MODEL = "bench-t16-p0"  # answers 16 tokens at once
STREAM_MODEL = "bench-t50-p20"  # 50 tokens, one every 20 ms
LONG_MODEL = "bench-t200-p50"  # 200 tokens, one every 50 ms

TARGET_CPU_MS = 6.0
TARGET_ADDED_P50_MS = 5.0
TARGET_STREAM_RATIO = 0.90
TARGET_ADDED_TTFT_MS = 10.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- /proc ------------------------------------------------------------------------------


@dataclass
class Proc:
    ppid: int
    comm: str
    ticks: int  # utime + stime
    rss: int  # bytes
    threads: int


def proc_table() -> dict[int, Proc]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue  # gone meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = Proc(
            ppid=int(rest[1]),
            comm=comm,
            ticks=int(rest[11]) + int(rest[12]),
            rss=int(rest[21]) * PAGE,
            threads=int(rest[17]),
        )
    return table


def tree(root: int, table: dict[int, Proc]) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("latin-1")
    except OSError:
        return ""


def machine_ticks() -> tuple[int, int, int]:
    """(busy, stolen, total) CPU ticks of the whole machine since boot. *Stolen* is the
    time the hypervisor gave this virtual machine's CPUs to others (steal): no process
    here ran then, so it is not counted as busy."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    stolen = values[7]
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle - stolen, stolen, total


@dataclass
class Snapshot:
    at: float
    real200_ticks: int
    real200_rss: int
    real200_threads: int
    real200_processes: int
    upstream_ticks: int
    postgres_ticks: int
    busy_ticks: int
    stolen_ticks: int
    total_ticks: int
    real200_each: dict[int, int] = field(default_factory=dict)  # ticks of each process


class Meter:
    """Reads the CPU and memory of the processes the benchmark cares about."""

    def __init__(self, real200_pid: int, upstream_pid: int, database: str) -> None:
        self.real200_pid = real200_pid
        self.upstream_pid = upstream_pid
        self.database = database

    def snapshot(self) -> Snapshot:
        table = proc_table()
        busy, stolen, total = machine_ticks()
        real200_pids = tree(self.real200_pid, table)
        real200 = [table[p] for p in real200_pids]
        upstream = [table[p] for p in tree(self.upstream_pid, table)]
        # PostgreSQL backends serving the bench database (the pool keeps them for the run).
        backends = [
            proc
            for pid, proc in table.items()
            if proc.comm == "postgres" and f" {self.database} " in cmdline(pid)
        ]
        return Snapshot(
            at=time.monotonic(),
            real200_ticks=sum(p.ticks for p in real200),
            real200_rss=sum(p.rss for p in real200),
            real200_threads=sum(p.threads for p in real200),
            real200_processes=len(real200),
            upstream_ticks=sum(p.ticks for p in upstream),
            postgres_ticks=sum(p.ticks for p in backends),
            busy_ticks=busy,
            stolen_ticks=stolen,
            total_ticks=total,
            real200_each={pid: table[pid].ticks for pid in real200_pids},
        )


# --- processes --------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts, each in its own session (process group), so
    that stopping one stops everything it started in turn."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, **kwargs)
        self.started.append((name, process))
        return process

    @staticmethod
    def _signal(process: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)  # the group this process leads, and only that

    def stop(self, process: subprocess.Popen, grace: float = 15.0) -> None:
        self._signal(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        self._signal(process, signal.SIGKILL)  # stragglers of the group, if any
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"process {process.pid} did not exit after SIGKILL")

    def stop_all(self) -> None:
        for name, process in reversed(self.started):
            if process.poll() is None:
                log(f"stopping {name} (pid {process.pid})")
            self.stop(process)
        self.started.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


# --- setup -------------------------------------------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    procs: Processes
    env: dict[str, str] = field(default_factory=dict)
    upstream_url: str = ""
    real200_url: str = ""
    api_keys: list[str] = field(default_factory=list)  # one per organization
    upstream: subprocess.Popen | None = None
    real200: subprocess.Popen | None = None
    real200_log: Path | None = None

    def psql(self, sql: str, database: str = "postgres") -> str:
        a = self.args
        argv = ["psql", "-h", a.pg_host, "-p", str(a.pg_port), "-U", a.pg_user, "-d", database]
        return run([*argv, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).strip()

    def manage(self, *argv: str) -> str:
        return run([PYTHON, "manage.py", *argv], env=self.env)

    def start_upstream(self) -> None:
        log_path = self.args.log_dir / "upstream.log"
        self.upstream = self.procs.start(
            "fake upstream",
            [PYTHON, str(BENCH / "upstream.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log_path.open("w"),
            text=True,
        )
        line = read_line_with_timeout(self.upstream, 30)
        if not line.startswith("ready "):
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.upstream_url = f"http://127.0.0.1:{int(line.split()[1])}"
        log(f"fake upstream on {self.upstream_url} (pid {self.upstream.pid})")

    def prepare_stores(self) -> None:
        a = self.args
        db = a.database
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", db):
            raise SystemExit(f"--database {db!r}: use lower-case letters, digits and _")
        self.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {db}")
        import redis  # the project's own dependency

        redis.Redis.from_url(a.redis_url).flushdb()
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{a.pg_user}@{quote(a.pg_host, safe='')}:{a.pg_port}/{db}",
            "REDIS_URL": a.redis_url,
            "SECRET_KEY": "bench-only-secret-key-not-for-production-0123456789",
            "HTTPS": "0",
            "CACHE_KEY_PREFIX": "real200-bench",
            "CELERY_QUEUE": CELERY_QUEUE,
            # The load comes from one key of one organization: lift the per-minute limits
            # so that they are counted (the work stays on every call) but never refuse.
            "ORG_DEFAULT_RPM": "1000000000",
            "PYTHON": PYTHON,
        }
        self.env.pop("DEBUG", None)
        log(f"database {db} recreated, {a.redis_url} flushed; migrating")
        self.manage("migrate", "--no-input", "-v0")
        orgs = ["bench"] + [f"bench{i}" for i in range(2, self.args.orgs + 1)]
        for org in orgs:
            self.manage("create_org", org, "--name", org, "--owner", f"{org}@example.com")
            self.manage("credit", "--org", org, "--amount", "1000000.00", "--note", "benchmark")
        models = (FAST_MODEL, STREAM_MODEL, LONG_MODEL)
        for model in models:
            self.manage("set_price", model, "--input", "0.15", "--output", "0.60")
        self.manage(
            "add_channel",
            "bench-upstream",
            "--type",
            "openai",
            "--base-url",
            f"{self.upstream_url}/v1",
            "--api-key",
            "sk-bench-upstream",
            "--models",
            ",".join(models),
            "--timeout",
            "60",
        )
        for org in orgs:
            out = self.manage("create_key", "--org", org, "--name", "bench", "--rpm", "1000000000")
            self.api_keys.append(out.split()[-1])
        self.manage("collectstatic", "--no-input", "-v0")  # as `make serve` does

    def start_real200(self) -> None:
        port = free_port()
        self.real200_url = f"http://127.0.0.1:{port}"
        env = {
            **self.env,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": str(self.args.workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.args.log_dir / "metrics"),
        }
        self.real200_log = self.args.log_dir / "real200.log"
        self.real200 = self.procs.start(
            "real200",
            [str(ROOT / "platform" / "serve")],
            env=env,
            stdout=self.real200_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.real200.poll() is not None:
                raise RuntimeError(f"real200 exited: {self.real200_log.read_text()[-3000:]}")
            if healthy(port):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("real200 did not answer /healthz within 60 s")
            time.sleep(0.2)
        # Every worker must be up before any measurement (the first /healthz proves one).
        # uvicorn forks workers under a supervisor only for more than one.
        processes = self.args.workers + 1 if self.args.workers > 1 else 1
        while len(tree(self.real200.pid, proc_table())) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError("real200's workers did not all start")
            time.sleep(0.2)
        time.sleep(1.0)
        log(f"real200 on {self.real200_url} (pid {self.real200.pid}, {self.args.workers} workers)")


def healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def read_line_with_timeout(process: subprocess.Popen, seconds: float) -> str:
    """A line of the process's stdout, or RuntimeError after `seconds`."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    if not box:
        raise RuntimeError(f"no answer from pid {process.pid} within {seconds} s")
    return box[0].strip()


# --- scenarios ---------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    target: str  # "direct" or "real200"
    result: dict[str, Any]
    before: Snapshot
    after: Snapshot
    open_samples: list[tuple[int, Snapshot]] = field(default_factory=list)
    loadgen_cpu_s: float = 0.0
    lock_waits: float | None = None  # bench-database sessions waiting on a lock, on average
    own_ttft_ms: float | None = None  # real200's time to first chunk, its records' (streams)

    @property
    def wall(self) -> float:
        return self.after.at - self.before.at

    def cpu_s(self, part: str) -> float:
        return (
            getattr(self.after, f"{part}_ticks") - getattr(self.before, f"{part}_ticks")
        ) / TICKS

    def per_call_ms(self, part: str) -> float | None:
        calls = self.result["requests"]
        return 1000 * self.cpu_s(part) / calls if calls else None

    def worker_split(self) -> str:
        """CPU seconds of each real200 process that worked: with few keep-alive connections
        the kernel may hand most of them to one worker, which then is the bottleneck."""
        seconds = sorted(
            ((ticks - self.before.real200_each.get(pid, 0)) / TICKS
             for pid, ticks in self.after.real200_each.items()),
            reverse=True,
        )  # fmt: skip
        return " / ".join(f"{s:.1f}" for s in seconds if s >= 0.05) or NONE

    @property
    def machine_busy(self) -> float:
        total = self.after.total_ticks - self.before.total_ticks
        return (self.after.busy_ticks - self.before.busy_ticks) / total if total else 0.0

    @property
    def machine_stolen(self) -> float:
        total = self.after.total_ticks - self.before.total_ticks
        return (self.after.stolen_ticks - self.before.stolen_ticks) / total if total else 0.0

    @property
    def other_cpu_s(self) -> float:
        """Busy CPU of the machine not spent by real200, the upstream, the load generator
        or the bench database's backends: other work on the machine (and Redis)."""
        busy = (self.after.busy_ticks - self.before.busy_ticks) / TICKS
        ours = self.loadgen_cpu_s + sum(self.cpu_s(p) for p in ("real200", "upstream", "postgres"))
        return max(busy - ours, 0.0)


class LockSampler:
    """Counts, twice a second, the bench database's sessions that wait on a lock (a row
    that another transaction holds): how much the calls queue behind each other."""

    def __init__(self, setup: Setup) -> None:
        import psycopg  # the project's own dependency

        a = setup.args
        self.connection = psycopg.connect(
            host=a.pg_host, port=a.pg_port, user=a.pg_user, dbname="postgres", autocommit=True
        )
        self.database = a.database
        self.samples: list[int] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
        )
        while not self.stopping.wait(0.5):
            self.samples.append(self.connection.execute(query, (self.database,)).fetchone()[0])

    def stop(self) -> float | None:
        self.stopping.set()
        self.thread.join(5)
        self.connection.close()
        return sum(self.samples) / len(self.samples) if self.samples else None


class Bench:
    def __init__(self, setup: Setup, meter: Meter) -> None:
        self.setup = setup
        self.meter = meter
        self.outcomes: list[Outcome] = []
        self.real200_ok = 0  # successful calls through real200, warm-up included

    def load(self, name: str, target: str, spec: dict[str, Any], record: bool = True) -> Outcome:
        setup = self.setup
        url = setup.upstream_url if target == "direct" else setup.real200_url
        spec = {
            "url": url + CHAT_PATH,
            "api_keys": [] if target == "direct" else setup.api_keys,
            "handshake": True,
            **spec,
        }
        spec.setdefault("expect_tokens", spec["max_tokens"])
        watchdog_s = spec["deadline"] + 60
        process = setup.procs.start(
            f"load generator ({name}, {target})",
            [PYTHON, str(BENCH / "loadgen.py"), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(setup.args.log_dir / "loadgen.log").open("a"),
            text=True,
        )
        # The load generator stops by its own deadline; this is the guard if it does not.
        watchdog = threading.Timer(watchdog_s, Processes._signal, (process, signal.SIGKILL))
        watchdog.start()
        locks = LockSampler(setup) if target == "real200" else None
        before = after = None
        result: dict[str, Any] | None = None
        samples: list[tuple[int, Snapshot]] = []
        try:
            for line in process.stdout:
                message = json.loads(line)
                event = message["event"]
                if event == "ready":
                    before = self.meter.snapshot()
                    started_at = time.time()
                    process.stdin.write("go\n")
                    process.stdin.flush()
                elif event == "open":
                    samples.append((message["open"], self.meter.snapshot()))
                elif event == "finished":
                    time.sleep(0.2)  # the last settlements and thread hand-backs
                    after = self.meter.snapshot()
                    process.stdin.write("go\n")
                    process.stdin.flush()
                elif event == "result":
                    result = message
            process.wait(timeout=30)
        finally:
            watchdog.cancel()
            lock_waits = locks.stop() if locks else None
            setup.procs.stop(process, grace=1)
        if result is None or before is None or after is None:
            raise RuntimeError(f"the load generator of {name} ({target}) gave no result")
        outcome = Outcome(
            name=name,
            target=target,
            result=result,
            before=before,
            after=after,
            open_samples=samples,
            lock_waits=lock_waits,
            loadgen_cpu_s=result["loadgen_cpu_s"],
        )
        if target == "real200":
            self.real200_ok += result["ok"]
            if spec.get("stream"):
                outcome.own_ttft_ms = self._own_ttft_ms(started_at, time.time())
        if record:
            self.outcomes.append(outcome)
        r = result
        log(
            f"{name:<22} {target:<8} ok {r['ok']:>6}/{r['requests']:<6} "
            f"{r['rate']} /s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors {r['errors']}"
        )
        return outcome

    def _own_ttft_ms(self, since: float, until: float) -> float | None:
        """The median of the streams' time to first chunk as real200 itself measured it
        (usage records' ttft_ms: from its view receiving the request to the first chunk
        going out), for the records settled in this scenario's time."""
        window = f"to_timestamp({since:.3f}) AND to_timestamp({until:.3f})"  # two floats
        median = self.setup.psql(OWN_TTFT_MEDIAN.format(window=window), self.setup.args.database)
        return float(median) if median else None

    def run_all(self) -> None:
        a = self.setup.args
        log("warm-up (not measured)")
        self.load(
            "warm-up",
            "real200",
            {"model": FAST_MODEL, "max_tokens": 16, "concurrency": 8, "duration": 3,
             "max_requests": 400, "deadline": 60},
            record=False,
        )  # fmt: skip
        self.load(
            "warm-up streams",
            "real200",
            {"model": STREAM_MODEL, "max_tokens": 50, "stream": True, "concurrency": 64,
             "duration": 2, "deadline": 60},
            record=False,
        )  # fmt: skip
        for concurrency in a.concurrency if "calls" in a.scenarios else ():
            for target in ("direct", "real200"):
                self.load(
                    f"non-streamed c={concurrency}",
                    target,
                    {"model": FAST_MODEL, "max_tokens": 16, "concurrency": concurrency,
                     "duration": a.duration, "max_requests": a.max_requests,
                     "deadline": a.duration + 60},
                )  # fmt: skip
        for name, spread in stream_arrivals(a) if "streams" in a.scenarios else ():
            for target in ("direct", "real200"):
                self.load(
                    name,
                    target,
                    {"model": STREAM_MODEL, "max_tokens": 50, "stream": True,
                     "concurrency": a.streams, "duration": a.duration, "spread": spread,
                     "deadline": a.duration + 60, "stall_gap": 1.0},
                )  # fmt: skip
        for target in ("direct", "real200") if "open" in a.scenarios else ():
            self.load(
                f"{a.open_streams} open streams",
                target,
                {"model": LONG_MODEL, "max_tokens": 200, "stream": True, "mode": "hold",
                 "concurrency": a.open_streams, "deadline": 120, "stall_gap": 2.0},
            )  # fmt: skip


def stream_arrivals(a: argparse.Namespace) -> list[tuple[str, float]]:
    """The stream scenario's two ways of starting: its clients' first requests spread over
    the length of one stream (1 s), as independent clients arrive, which is what the
    targets are judged on; and all at once. Clients that start together stay in step
    with a fake upstream whose streams all last exactly 1 s: the last row is a herd of
    `a.streams` calls arriving in the same instant, every second.

    The spread start runs `a.stream_runs` times, direct and through real200 in turn: its
    added time to first token moves by a factor of two between runs of the same code on
    the same machine, so the targets are judged on the median run, not on one draw."""
    spread = [
        (f"{a.streams} streams" + (f", run {n}" if n > 1 else ""), 1.0)
        for n in range(1, a.stream_runs + 1)
    ]
    return [*spread, (f"{a.streams} streams together", 0.0)]


# --- the report --------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return NONE if value is None else f"{value:,.{digits}f}"


def errors_text(result: dict[str, Any]) -> str:
    errors = result["errors"]
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "0"


def median_of(values: list[float | None]) -> float | None:
    """The median run; None if any run could not be measured."""
    return None if None in values else statistics.median(values)


def runs_text(values: list[float | None]) -> str:
    """The runs behind a median, when there are several."""
    return f" (median of runs: {', '.join(fmt(v) for v in values)})" if len(values) > 1 else ""


def verdict(ok: bool | None) -> str:
    return NONE if ok is None else ("**met**" if ok else "**missed**")


def python_loop_ms() -> float:
    """The best of three timings of a fixed pure-Python loop (ten million additions), in ms.

    The speed of a core this hour. It does not feel the caches, memory or the kernel's
    network path: on 2026-11-26 it read a normal ~360 ms in runs where the fake upstream
    used three times its usual CPU (bench/README.md). Read it beside the direct rows."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best * 1000


_ECHO = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(256):
    c.sendall(data)
"""


def loopback_round_trip_us(trips: int = 20_000) -> float:
    """The best of three means of a 100-byte round trip over TCP on 127.0.0.1 to another
    process, in µs: a system call each way, a wake-up of the other process, the kernel's
    network path. That is most of what relaying a chunk costs, and what a slow host slows
    (on 2026-11-26: 23-32 µs on an hour when real200 ran three times slower than before)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)  # an echo process that never connects fails the run
        echo = subprocess.Popen([PYTHON, "-c", _ECHO, str(listener.getsockname()[1])])
        try:
            peer, _ = listener.accept()
            with peer:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                best = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    for _ in range(trips):
                        peer.sendall(b"x" * 100)
                        peer.recv(256)
                    best = min(best, time.perf_counter() - started)
        finally:
            echo.wait(timeout=10)
    return best / trips * 1e6


def kernel_mitigations() -> str:
    """The kernel's mitigations that tax every system call and context switch, the bulk
    of a relay's work (the machine kind has run kernels with and without them)."""
    found = []
    for name in ("spectre_v2", "spec_rstack_overflow", "retbleed"):
        try:
            with open(f"/sys/devices/system/cpu/vulnerabilities/{name}") as f:
                found.append(f"{name}: {f.read().strip()}")
        except OSError:
            continue
    return "; ".join(found) or "unknown"


def machine_info(
    setup: Setup, load_before: str, loop_ms: tuple[float, float], trip_us: tuple[float, float]
) -> list[str]:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    import redis

    redis_version = redis.Redis.from_url(setup.args.redis_url).info("server")["redis_version"]
    pg_version = setup.psql("SHOW server_version")
    try:
        commit = run(["git", "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).strip()
    except (OSError, RuntimeError):
        commit, dirty = "unknown (not a git checkout)", ""
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model}), {mem_kb / 1024 / 1024:.1f} GiB memory, "
        f"{platform.system()} {platform.release()}",
        f"- kernel mitigations: {kernel_mitigations()}",
        f"- Python {platform.python_version()}, PostgreSQL {pg_version}, Redis {redis_version}",
        f"- load average before the run: {load_before}",
        f"- machine speed: a fixed pure-Python loop (10 M additions) took {loop_ms[0]:,.0f} ms "
        f"before the run and {loop_ms[1]:,.0f} ms after it (best of three); a 100-byte TCP "
        f"round trip to another process on 127.0.0.1 took {trip_us[0]:.1f} µs before and "
        f"{trip_us[1]:.1f} µs after",
        f"- real200: platform/serve, WEB_CONCURRENCY={setup.args.workers}, HTTPS=0, "
        f"PostgreSQL database {setup.args.database}, Redis {setup.args.redis_url}; "
        f"load from {setup.args.orgs} organization(s), one key each",
    ]


def report(bench: Bench, machine: list[str], checks: list[str], targets: list[str]) -> str:
    by = {(o.name, o.target): o for o in bench.outcomes}
    a = bench.setup.args
    lines = ["# real200 benchmark", "", *machine, ""]
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|", *targets, ""]
    if "calls" in a.scenarios:
        lines += calls_section(by, a)
    if "streams" in a.scenarios:
        lines += streams_section(by, a)
    if "open" in a.scenarios:
        lines += open_section(by, a)
    lines += [
        "## Where the machine's CPU went, per scenario",
        "",
        "Seconds of CPU during each scenario. *Other* is the machine's busy time minus ours: "
        "Redis and anything else running on the machine. *Stolen*: the share of the "
        "machine's CPU time that the hypervisor gave to other guests (steal), when nothing "
        "here could run; every figure of a run with much of it is slower than the code. "
        "*real200 CPU by process*: each worker's share (one worker is at most one core, "
        "because of the GIL).",
        "",
        "| scenario | target | wall s | real200 | upstream | load generator | PostgreSQL "
        "(bench db) | other | machine busy | stolen | sessions waiting on a lock | real200 "
        "CPU by process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for o in bench.outcomes:
        lines.append(
            f"| {o.name} | {o.target} | {o.wall:.1f} | {o.cpu_s('real200'):.2f} "
            f"| {o.cpu_s('upstream'):.2f} | {o.loadgen_cpu_s:.2f} | {o.cpu_s('postgres'):.2f} "
            f"| {o.other_cpu_s:.2f} | {o.machine_busy:.0%} | {o.machine_stolen:.0%} "
            f"| {fmt(o.lock_waits)} "
            f"| {o.worker_split() if o.target == 'real200' else NONE} |"
        )
    lines += ["", "## After the load", "", *checks, ""]
    return "\n".join(lines)


Outcomes = dict[tuple[str, str], Outcome]


def calls_section(by: Outcomes, a: argparse.Namespace) -> list[str]:
    lines = [
        "## Non-streamed calls (16 tokens, answered at once)",
        "",
        f"Each row: {a.duration:g} s or {a.max_requests} requests, whichever comes first. "
        "CPU per call is the utime+stime of the whole real200 process tree (uvicorn and its "
        "workers) over the calls; PostgreSQL's is that of the bench database's backends. "
        "Sessions waiting on a lock: the bench database's sessions blocked on a lock another "
        "transaction holds (e.g. the organization's account row), sampled twice a second.",
        "",
        "| concurrency | target | calls | req/s | p50 ms | p99 ms | added p50 ms | "
        "real200 CPU ms/call | PostgreSQL CPU ms/call | sessions waiting on a lock | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in a.concurrency:
        direct = by.get((f"non-streamed c={c}", "direct"))
        relayed = by.get((f"non-streamed c={c}", "real200"))
        for o in (direct, relayed):
            if o is None:
                continue
            r = o.result
            added = (
                r["p50_ms"] - direct.result["p50_ms"]
                if o is relayed and direct and r["p50_ms"] is not None
                else None
            )
            real200 = o.target == "real200"
            lines.append(
                f"| {c} | {o.target} | {r['ok']:,} | {fmt(r['rate'], 0)} | {fmt(r['p50_ms'], 2)} "
                f"| {fmt(r['p99_ms'], 2)} | {fmt(added, 2)} "
                f"| {fmt(o.per_call_ms('real200'), 2) if real200 else NONE} "
                f"| {fmt(o.per_call_ms('postgres'), 2) if real200 else NONE} "
                f"| {fmt(o.lock_waits)} | {errors_text(r)} |"
            )
    return [*lines, ""]


def streams_section(by: Outcomes, a: argparse.Namespace) -> list[str]:
    lines = [
        f"## {a.streams} concurrent streams (50 tokens, one every 20 ms)",
        "",
        f"{a.streams} clients each open streams back to back for {a.duration:g} s. Their first "
        "requests are spread over one second (*spread*, what the targets are judged on) or "
        "sent all at once (*together*: with streams that all last 1 s, the clients then stay "
        f"in step, and {a.streams} calls arrive in the same instant every second). Tokens/s "
        "counts the tokens delivered in the window; TTFT is from sending the request to the "
        "first text token. *real200's first chunk*: from its view receiving the request to the "
        "first chunk (the role's) going out, as real200 records it (usage records' "
        "`ttft_ms`); the fake upstream sends that chunk at once (its first text token "
        "20 ms later), so this is the part of the added TTFT spent inside real200's view, "
        "the hold, the rate limits and the round trip to the upstream; the rest lies outside "
        "it (the request reaching the view, the token reaching the client).",
        "",
        "| start | target | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | real200's first chunk "
        "p50 ms | total p50 ms | total p99 ms | longest gap ms | stalled (gap > 1 s) | real200 "
        "CPU ms/stream | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (name, spread), target in itertools.product(stream_arrivals(a), ("direct", "real200")):
        o = by.get((name, target))
        if o is None:
            continue
        r = o.result
        start = name.replace(f"{a.streams} streams", "spread" if spread else "").strip(", ")
        lines.append(
            f"| {start or 'together'} | {target} | {r['ok']:,} "
            f"| {fmt(r['window_token_rate'], 0)} "
            f"| {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | {fmt(o.own_ttft_ms)} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_gap_ms'], 0)} "
            f"| {r['stalled']} "
            f"| {fmt(o.per_call_ms('real200'), 2) if target == 'real200' else NONE} "
            f"| {errors_text(r)} |"
        )
    return [*lines, ""]


def open_section(by: Outcomes, a: argparse.Namespace) -> list[str]:
    name = f"{a.open_streams} open streams"
    lines = [
        f"## {a.open_streams} streams open at once (200 tokens, one every 50 ms)",
        "",
        f"All {a.open_streams} requests are sent within 1 s and held to their end. Memory per "
        "open stream: RSS of the real200 process tree at the most streams open, minus its RSS "
        "before, divided by the streams open then.",
        "",
        "| target | completed | errors | stalled (gap > 2 s) | most open at once | "
        "TTFT p50 ms | TTFT p99 ms | total p50 s | total p99 s | longest gap ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in ("direct", "real200"):
        o = by.get((name, target))
        if o is None:
            continue
        r = o.result
        seconds = (
            f"{fmt(r['p50_ms'] / 1000, 2)} | {fmt(r['p99_ms'] / 1000, 2)}"
            if r["p50_ms"] is not None
            else f"{NONE} | {NONE}"
        )
        lines.append(
            f"| {target} | {r['ok']:,} | {errors_text(r)} | {r['stalled']} | {r['max_open']} "
            f"| {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | {seconds} "
            f"| {fmt(r['max_gap_ms'], 0)} |"
        )
    memory = open_stream_memory(by.get((name, "real200")))
    if memory:
        lines += ["", *memory]
    return [*lines, ""]


def open_stream_memory(o: Outcome | None) -> list[str]:
    if o is None or not o.open_samples:
        return []
    most, at = max(o.open_samples, key=lambda sample: (sample[0], sample[1].real200_rss))
    peak_rss = max(s.real200_rss for _, s in o.open_samples)
    mib = 1024 * 1024
    per_stream = (at.real200_rss - o.before.real200_rss) / most if most else None
    return [
        f"real200 memory: RSS {o.before.real200_rss / mib:.0f} MiB before, "
        f"{at.real200_rss / mib:.0f} MiB with {most} streams open "
        f"(peak {peak_rss / mib:.0f} MiB), so **{fmt(per_stream / 1024 if per_stream else None)} "
        f"KiB per open stream**; threads {o.before.real200_threads} before, "
        f"{at.real200_threads} then ({o.before.real200_processes} processes).",
    ]


def targets_and_verdicts(bench: Bench) -> tuple[list[str], dict[str, bool | None]]:
    by = {(o.name, o.target): o for o in bench.outcomes}
    a = bench.setup.args
    rows, verdicts = [], {}

    def row(key: str, label: str, measured: str, ok: bool | None) -> None:
        verdicts[key] = ok
        rows.append(f"| {label} | {measured} | {verdict(ok)} |")

    c32 = by.get(("non-streamed c=32", "real200"))
    cpu = c32.per_call_ms("real200") if c32 else None
    row("cpu", f"real200 CPU per call at concurrency 32 ≤ {TARGET_CPU_MS:g} ms",
        f"{fmt(cpu, 2)} ms", None if cpu is None else cpu <= TARGET_CPU_MS)  # fmt: skip
    d1, r1 = by.get(("non-streamed c=1", "direct")), by.get(("non-streamed c=1", "real200"))
    added = r1.result["p50_ms"] - d1.result["p50_ms"] if d1 and r1 and r1.result["ok"] else None
    row("latency", f"added p50 latency at concurrency 1 ≤ {TARGET_ADDED_P50_MS:g} ms",
        f"{fmt(added, 2)} ms", None if added is None else added <= TARGET_ADDED_P50_MS)  # fmt: skip
    ratios, ttfts, together = [], [], None  # the spread runs', the together run's
    for name, spread in stream_arrivals(a):
        ds, rs = by.get((name, "direct")), by.get((name, "real200"))
        ratio = ttft = None
        if ds and rs and ds.result["window_token_rate"]:
            ratio = rs.result["window_token_rate"] / ds.result["window_token_rate"]
        if ds and rs and rs.result["ttft_p50_ms"] is not None:
            ttft = rs.result["ttft_p50_ms"] - ds.result["ttft_p50_ms"]
        if spread:
            ratios.append(ratio)
            ttfts.append(ttft)
        else:
            together = ratio, ttft
    if ratios:
        ratio, ttft = median_of(ratios), median_of(ttfts)
        percents = [None if r is None else r * 100 for r in ratios]
        row("throughput",
            f"{a.streams} streams: throughput ≥ {TARGET_STREAM_RATIO:.0%} of direct",
            f"{fmt(None if ratio is None else ratio * 100)} %{runs_text(percents)}",
            None if ratio is None else ratio >= TARGET_STREAM_RATIO)  # fmt: skip
        row("ttft", f"{a.streams} streams: added TTFT p50 ≤ {TARGET_ADDED_TTFT_MS:g} ms",
            f"{fmt(ttft)} ms{runs_text(ttfts)}",
            None if ttft is None else ttft <= TARGET_ADDED_TTFT_MS)  # fmt: skip
    if together and together[0] is not None:  # for comparison: no target
        row("together", f"({a.streams} streams all starting together: throughput, "
            "added TTFT p50)", f"{together[0] * 100:.1f} %, {fmt(together[1])} ms",
            None)  # fmt: skip
    ro = by.get((f"{a.open_streams} open streams", "real200"))
    if ro:
        r = ro.result
        bad = r["requests"] - r["ok"] + r["stalled"]
        row("open", f"{a.open_streams} open streams: no error, none stalled",
            f"{r['requests'] - r['ok']} errors, {r['stalled']} stalled", bad == 0)  # fmt: skip
    return rows, verdicts


CELERY_QUEUE = "real200-bench"


def settle_deferred(setup: Setup) -> list[str]:
    """A call whose settlement fails in the request (e.g. no database connection within
    the pool's timeout) is queued for the books worker, and its hold stays open until then.
    If any were queued, run that worker as `make worker` does until the queue is empty and
    no hold is open (two minutes at most), so that the books can be checked."""
    import redis

    queued = redis.Redis.from_url(setup.args.redis_url).llen(CELERY_QUEUE)
    if not queued:
        return ["- settlements deferred to the books worker: 0"]
    log(f"{queued} settlements were deferred; running the books worker to settle them")
    worker = setup.procs.start(
        "books worker",
        [str(Path(PYTHON).parent / "celery"), "-A", "config", "worker", "--pool", "solo",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        env=setup.env,
        stdout=(setup.args.log_dir / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline, open_holds = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        time.sleep(1)
        open_holds = int(setup.psql(OPEN_HOLDS, setup.args.database))
        left = redis.Redis.from_url(setup.args.redis_url).llen(CELERY_QUEUE)
        if not left and not open_holds:
            break
    setup.procs.stop(worker)
    return [
        f"- settlements deferred to the books worker: **{queued}** (settling in the request "
        "failed; see the log), settled by `celery -A config worker` after the load "
        f"({'all of them' if open_holds == 0 else f'{open_holds} holds still open'})"
    ]


OPEN_HOLDS = "SELECT count(*) FROM billing_hold WHERE status = 'open'"
OWN_TTFT_MEDIAN = (
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ttft_ms) FROM usage_usagerecord "
    "WHERE is_stream AND created_at BETWEEN {window}"
)


def after_checks(setup: Setup, bench: Bench) -> tuple[list[str], bool]:
    lines, ok = settle_deferred(setup), True
    result = subprocess.run(
        [PYTHON, "manage.py", "reconcile"],
        cwd=ROOT,
        env=setup.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    clean = result.returncode == 0
    ok &= clean
    lines.append(f"- `manage.py reconcile`: {'clean' if clean else 'NOT CLEAN'}")
    lines += [f"  - {line}" for line in result.stdout.strip().splitlines()]
    db = setup.args.database
    records = int(setup.psql("SELECT count(*) FROM usage_usagerecord", db))
    by_outcome = setup.psql(
        "SELECT status_code || ' ' || end_reason || ': ' || count(*) FROM usage_usagerecord "
        "GROUP BY status_code, end_reason ORDER BY count(*) DESC",
        db,
    ).replace("\n", ", ")
    open_holds = int(setup.psql(OPEN_HOLDS, db))
    same = records == bench.real200_ok
    ok &= same and open_holds == 0
    lines.append(
        f"- usage records: {records:,} ({by_outcome}); successful calls through real200 "
        f"(warm-up included): {bench.real200_ok:,}: {'equal' if same else 'DIFFERENT'}"
    )
    lines.append(f"- holds still open: {open_holds}")
    server_log = setup.real200_log.read_text(errors="replace") if setup.real200_log else ""
    errors = [line for line in server_log.splitlines() if " ERROR " in line or "Traceback" in line]
    lines.append(f"- real200 log: {len(errors)} error lines ({setup.real200_log})")
    lines += [f"  - `{line[:200]}`" for line in errors[:5]]
    return lines, ok


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="real200's benchmark (see bench/README.md)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=("calls", "streams", "open"),
        default=["calls", "streams", "open"],
        help="non-streamed calls, concurrent streams, open streams (default: all three)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--max-requests", type=int, default=5000, help="per non-streamed row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument(
        "--stream-runs",
        type=int,
        default=3,
        help="runs of the spread stream scenario; its targets are judged on the median run",
    )
    parser.add_argument("--open-streams", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY")
    parser.add_argument(
        "--orgs",
        type=int,
        default=1,
        help="spread the load over this many organizations, a key each (default 1)",
    )
    parser.add_argument("--database", default="real200_bench", help="dropped and recreated")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="flushed")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument(
        "--keep-running",
        type=float,
        default=0,
        metavar="SECONDS",
        help="after the load, keep real200 up this long (profiling); then stop as usual",
    )
    return parser.parse_args()


def raise_file_limit() -> None:
    """A thousand streams need more than 1,024 descriptors in the load generator and in
    each real200 worker (client and upstream sockets): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    args = parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / "loadgen.log").write_text("")
    raise_file_limit()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    log(f"load average before the run: {load_before} on {os.cpu_count()} CPUs")
    loop_before, trip_before = python_loop_ms(), loopback_round_trip_us()
    log(f"machine speed: loop {loop_before:,.0f} ms, loopback round trip {trip_before:.1f} µs")
    procs = Processes()
    setup = Setup(args=args, procs=procs)
    try:
        setup.start_upstream()
        setup.prepare_stores()
        setup.start_real200()
        meter = Meter(setup.real200.pid, setup.upstream.pid, args.database)
        bench = Bench(setup, meter)
        bench.run_all()
        if args.keep_running:
            log(f"real200 stays up {args.keep_running:g} s on {setup.real200_url}, key in log")
            (args.log_dir / "api_key").write_text(setup.api_keys[0])
            time.sleep(args.keep_running)
        checks, checks_ok = after_checks(setup, bench)
        targets, verdicts = targets_and_verdicts(bench)
        loop_ms = (loop_before, python_loop_ms())
        trip_us = (trip_before, loopback_round_trip_us())
        machine = machine_info(setup, load_before, loop_ms, trip_us)
        text = report(bench, machine, checks, targets)
    finally:
        procs.stop_all()
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = datetime.now(UTC).strftime("%Y-%m-%d")
    path = args.results / f"{stem}.md"
    n = 2
    while path.exists():
        path = args.results / f"{stem}-{n}.md"
        n += 1
    path.write_text(text + "\n")
    log(f"written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if checks_ok and all(v is not False for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
