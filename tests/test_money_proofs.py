"""The money invariants proven with real processes: a real200 server with two worker
processes, a real Celery worker, PostgreSQL and Redis, upstreams on 127.0.0.1.

Each scenario ends with the books reconciled to the unit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from django.db import connection, connections

from apps.billing.models import Account, Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import call_cost_nano, parse_usd
from apps.billing.services import credit_grant
from apps.billing.tasks import release_stale_holds
from apps.catalog.services import channel_add, price_set
from apps.gateway.tokens import count_prompt_tokens, count_text_tokens
from apps.keys.services import key_create
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from apps.usage.models import EndReason, UsageRecord
from apps.usage.services import books_reconcile
from config.celery import app as celery_app
from tests.fakes import text_for
from tests.fakes.upstreams import OpenAIFake
from tests.servers import database_url_for_subprocess, real200_server

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

MESSAGES = [{"role": "user", "content": "Say hello to the ledger."}]
MAX_TOKENS = 20


def _wait_for(condition, seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _setup(fake: OpenAIFake, funding_nano: int):
    owner = User.objects.create_user(email="proof@example.com", password="x-long-password")
    org = organization_create(slug="proof", name="Proof", owner=owner)
    if funding_nano:
        credit_grant(organization=org, amount_nano=funding_nano)
    price = price_set(
        model_name="gpt-4o",
        input_nano_per_mtok=parse_usd("2.50"),
        cached_input_nano_per_mtok=parse_usd("1.25"),
        output_nano_per_mtok=parse_usd("10.00"),
    )
    channel_add(
        name="upstream",
        kind="openai",
        base_url=fake.base_url,
        models={"gpt-4o": "gpt-4o"},
        timeout_seconds=10,
    )
    _key, clear = key_create(organization=org, name="proof")
    return org, price, clear


def _server_env() -> dict[str, str]:
    return {"DATABASE_URL": database_url_for_subprocess(), "REDIS_URL": os.environ["REDIS_URL"]}


@contextmanager
def _celery_worker() -> Iterator[None]:
    with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        yield
    connections.close_all()


def _fresh_test_connections() -> None:
    """This process's pool backs off while the database is away; after a blip, start a
    new one rather than wait for its next reconnection attempt."""
    for conn in connections.all():
        conn.close()
        if hasattr(conn, "close_pool"):
            conn.close_pool()


def _assert_books_clean() -> None:
    _fresh_test_connections()
    report = books_reconcile()
    assert report.is_clean, report.problems


def test_an_organization_funded_for_n_calls_gets_at_most_n_of_5n_concurrent_calls():
    prompt = count_prompt_tokens(MESSAGES, "gpt-4o")
    n = 8
    with OpenAIFake(tokens=MAX_TOKENS, prompt_tokens=prompt, pace=0.005) as fake:
        _org, price, key = _setup(fake, 0)
        cost = call_cost_nano(
            prompt_tokens=prompt,
            cached_tokens=0,
            cache_write_tokens=0,
            completion_tokens=MAX_TOKENS,
            rates=price,
        )
        org_id = _org.pk
        credit_grant(organization=_org, amount_nano=n * cost)
        with real200_server(workers=2, env=_server_env()) as server:

            async def one(client: httpx.AsyncClient) -> int:
                body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
                answer = await client.post(
                    f"{server.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                )
                return answer.status_code

            async def burst() -> list[int]:
                limits = httpx.Limits(max_connections=5 * n)
                async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                    return await asyncio.gather(*(one(client) for _ in range(5 * n)))

            statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 402}, statuses
    assert statuses.count(200) <= n
    assert statuses.count(200) == n  # exactly funded: nothing else can refuse a call here
    account = Account.objects.get(organization_id=org_id)
    assert (account.balance_nano, account.held_nano) == (0, 0)
    charges = Transfer.objects.filter(kind=TransferKind.CHARGE)
    assert charges.count() == UsageRecord.objects.count() == n
    assert sum(charges.values_list("amount_nano", flat=True)) == n * cost
    assert len(fake.calls) == n  # a refused call never reached the upstream
    _assert_books_clean()


def test_concurrent_streams_cut_short_are_each_billed_what_the_upstream_produced():
    """Thirty streams at once over two worker processes; every other client leaves after a
    few chunks. Each call is settled exactly once: those read to the end at the upstream's
    own count, the others at what the upstream produced until real200 closed it (no more,
    and short of it by no more than two tokens in flight each), and the books reconcile
    to the unit."""
    funding = parse_usd("5.00")
    n, tokens = 30, 200
    with OpenAIFake(tokens=tokens, pace=0.01) as fake:
        org, _price, key = _setup(fake, funding)
        with real200_server(workers=2, env=_server_env()) as server:

            async def one(client: httpx.AsyncClient, index: int) -> None:
                body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": tokens,
                        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                leave_after = 3 + index % 10 if index % 2 else None
                chunks = 0
                async with client.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        chunks += line.startswith("data: {")
                        if leave_after and chunks >= leave_after:
                            return  # leaving the block closes the connection

            async def all_at_once() -> None:
                limits = httpx.Limits(max_connections=n)
                async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                    await asyncio.gather(*(one(client, index) for index in range(n)))

            asyncio.run(all_at_once())
            _wait_for(lambda: UsageRecord.objects.count() == n, what="every call's settlement")
    assert len(fake.calls) == n
    cut = [call for call in fake.calls if not call.completed]
    assert len(cut) == n // 2
    assert all(call.wait_disconnected(5) for call in cut)
    records = list(UsageRecord.objects.all())
    done = [r for r in records if r.end_reason == EndReason.DONE]
    gone = [r for r in records if r.end_reason == EndReason.CLIENT_GONE]
    assert len(done) == len(gone) == n // 2
    assert {r.completion_tokens for r in done} == {tokens}
    produced = [call.tokens_at_disconnect for call in cut]
    billed = sum(r.completion_tokens for r in gone)
    assert sum(_words_in_tokens(max(k - 2, 0)) for k in produced) <= billed
    assert billed <= sum(_words_in_tokens(k) for k in produced)
    account = Account.objects.get(organization=org)
    charged = sum(r.charged_nano for r in records)
    assert (account.balance_nano, account.held_nano) == (funding - charged, 0)
    assert not Hold.objects.filter(status=HoldStatus.OPEN).exists()
    _assert_books_clean()


def _words_in_tokens(words: int) -> int:
    """The tokens of the fake's first `words` words, as real200 counts them."""
    return count_text_tokens(text_for(words), "gpt-4o")


def test_a_web_process_killed_mid_stream_leaves_a_hold_the_task_releases():
    funding = parse_usd("5.00")
    with OpenAIFake(tokens=400, pace=0.05) as fake:
        org, _price, key = _setup(fake, funding)
        with real200_server(workers=1, env=_server_env()) as server:
            body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 400, "stream": True}
            with httpx.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            ) as response:
                lines = response.iter_lines()
                received = [line for _, line in zip(range(8), lines, strict=False) if line]
                assert received
                os.killpg(server.pid, signal.SIGKILL)
        assert fake.calls[-1].wait_disconnected(5)
    hold = Hold.objects.get()
    assert hold.status == HoldStatus.OPEN  # nobody settled: the process died
    account = Account.objects.get(organization=org)
    assert account.held_nano == hold.amount_nano
    # The hold outlives any call it could belong to; let it expire, then the task runs.
    Hold.objects.filter(pk=hold.pk).update(expires_at=hold.created_at)
    with _celery_worker():
        release_stale_holds.delay()
        _wait_for(
            lambda: Hold.objects.get(pk=hold.pk).status == HoldStatus.RELEASED,
            what="the hold's release",
        )
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (funding, 0)
    assert not Transfer.objects.filter(kind=TransferKind.CHARGE).exists()
    _assert_books_clean()


@contextmanager
def _database_unreachable(name: str) -> Iterator[None]:
    """Refuse new connections to the test database and cut the open ones, then allow them
    again: a database blip, as real as it gets without stopping the server."""
    with psycopg.connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
    ) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


def test_a_settlement_that_fails_on_a_database_blip_is_finished_later_exactly_once():
    funding = parse_usd("5.00")
    database = connection.settings_dict["NAME"]
    with OpenAIFake(tokens=30, pace=0.05, prompt_tokens=12) as fake:
        org, price, key = _setup(fake, funding)
        connections.close_all()
        # A short pool timeout, so the request gives up on the database quickly.
        env = {**_server_env(), "DB_POOL_TIMEOUT": "2"}
        with real200_server(workers=1, env=env) as server, _celery_worker():
            body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 30, "stream": True}
            chunks: list[str] = []
            first_chunk = threading.Event()

            def call() -> None:
                with httpx.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                ) as response:
                    for line in response.iter_lines():
                        if line:
                            chunks.append(line)
                            first_chunk.set()

            caller = threading.Thread(target=call)
            caller.start()
            assert first_chunk.wait(10)
            with _database_unreachable(database):
                caller.join(timeout=20)  # the stream ends while the database is away
                _wait_for(
                    lambda: "a task will finish it" in server.log(),
                    what="the failed settlement to be handed to the worker",
                )
                time.sleep(2)  # the worker retries against the unreachable database
            _fresh_test_connections()
            _wait_for(lambda: UsageRecord.objects.exists(), what="the task's settlement")
    assert chunks[-1] == "data: [DONE]"
    record = UsageRecord.objects.get()
    assert (record.prompt_tokens, record.completion_tokens) == (12, 30)
    assert record.end_reason == EndReason.DONE
    cost = call_cost_nano(
        prompt_tokens=12, cached_tokens=0, cache_write_tokens=0, completion_tokens=30, rates=price
    )
    assert record.charged_nano == cost
    assert Hold.objects.get().status == HoldStatus.SETTLED
    assert Transfer.objects.filter(kind=TransferKind.CHARGE).count() == 1
    account = Account.objects.get(organization=org)
    assert (account.balance_nano, account.held_nano) == (funding - cost, 0)
    _assert_books_clean()


def test_with_the_database_away_a_call_is_a_503_to_retry_and_charges_nothing():
    database = connection.settings_dict["NAME"]
    with OpenAIFake(tokens=5) as fake:
        _org, _price, key = _setup(fake, parse_usd("5.00"))
        connections.close_all()
        env = {**_server_env(), "DB_POOL_TIMEOUT": "1"}
        with real200_server(workers=1, env=env) as server:
            body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
            headers = {"Authorization": f"Bearer {key}"}
            assert (
                httpx.post(
                    f"{server.url}/v1/chat/completions", json=body, headers=headers
                ).status_code
                == 200
            )
            with _database_unreachable(database):
                answer = httpx.post(
                    f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30
                )
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("api_error", "server_busy")
    assert len(fake.calls) == 1  # the second call never reached the upstream
    _assert_books_clean()
    assert Transfer.objects.filter(kind=TransferKind.CHARGE).count() == 1
