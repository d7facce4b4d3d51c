"""A real server process, started as `make serve` starts it, answering the probes."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import database_url_for_subprocess, free_port, real200_server


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_server_process_is_alive_and_ready_on_postgres():
    env = {"DATABASE_URL": database_url_for_subprocess()}
    with real200_server(workers=2, env=env) as server:
        base_url = server.url
        assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{base_url}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "database": "ok", "cache": "ok"}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_readyz_answers_503_naming_the_part_that_is_down():
    dead_port = free_port()  # nothing listens there
    env = {
        "DATABASE_URL": database_url_for_subprocess(),
        "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0",
    }
    with real200_server(env=env) as server:
        base_url = server.url
        assert httpx.get(f"{base_url}/healthz").status_code == 200
        ready = httpx.get(f"{base_url}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "database": "ok", "cache": "unavailable"}
