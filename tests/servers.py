"""real200 itself as a real server process, the way `make serve` runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_for_subprocess() -> str:
    """The URL of the database this test runs on, for a server in another process."""
    params = connection.settings_dict
    user = params.get("USER") or "postgres"
    host = params.get("HOST") or "127.0.0.1"
    port = params.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{params['NAME']}"


@dataclass
class RunningServer:
    url: str
    pid: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def real200_server(
    *, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """Start `platform/serve` on a free port; yield it once /healthz answers. The process
    group is ended afterwards (if a test has not killed it already)."""
    port = free_port()
    full_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "HTTPS": "0",
        "SECRET_KEY": os.environ.get("SECRET_KEY", "test-server-secret"),
        "PYTHON": str(Path(os.sys.executable)),
        **(env or {}),
    }
    log = tempfile.NamedTemporaryFile(prefix="real200-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [str(ROOT / "platform" / "serve")],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = RunningServer(url=f"http://127.0.0.1:{port}", pid=process.pid, log_path=Path(log.name))
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"real200 exited: {server.log()[-2000:]}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("real200 did not answer /healthz within 30 s")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        log.close()
        server.log_path.unlink(missing_ok=True)


@contextmanager
def asgi_in_thread(application, *, name: str = "real200-live") -> Iterator[str]:
    """Serve an ASGI application with uvicorn in a thread of this process (it shares the
    test's settings and caches); yield its base URL once it accepts connections."""
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        application, host="127.0.0.1", port=port, lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
