"""Key policy and rate limits, held across the processes of a real server on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
import time_machine
from django.utils import timezone

from apps.billing.models import Hold, HoldStatus, Transfer
from apps.billing.money import parse_usd
from apps.billing.services import account_for_organization, credit_grant, key_spent_nano
from apps.catalog.services import channel_add, price_set
from apps.keys.limits import ALWAYS, counters, counters_close, counters_forget, openai_duration
from apps.keys.models import ApiKey, BudgetPeriod, hash_key
from apps.keys.services import key_create, key_revoke
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from tests.fakes.upstreams import OpenAIFake
from tests.servers import database_url_for_subprocess, free_port, real200_server

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.999, "999ms"), (1, "1s"), (6, "6s"), (59.2, "1m0s"), (90, "1m30s")],
)
def test_reset_times_use_openais_format(seconds, text):
    assert openai_duration(seconds) == text


def test_a_monthly_budget_counts_only_this_months_charges(funded_org, price):
    from apps.billing.models import AccountKind, TransferKind
    from apps.billing.services import system_account, transfer_post

    key, _ = key_create(
        organization=funded_org, budget_nano=10**9, budget_period=BudgetPeriod.MONTHLY
    )

    def charge(amount: int) -> None:
        transfer_post(
            from_account=account_for_organization(organization=funded_org),
            to_account=system_account(AccountKind.REVENUE),
            amount_nano=amount,
            kind=TransferKind.CHARGE,
            api_key_id=key.pk,
        )

    with time_machine.travel("2026-10-31 23:59:00+00:00", tick=False):
        charge(700)
    with time_machine.travel("2026-11-01 00:01:00+00:00", tick=False):
        charge(300)
        now = timezone.now()
        assert key_spent_nano(key_id=key.pk, period=BudgetPeriod.MONTHLY, now=now) == 300
        assert key_spent_nano(key_id=key.pk, period=BudgetPeriod.LIFETIME, now=now) == 1000


@pytest.fixture
def fake_upstream():
    with OpenAIFake(tokens=5, prompt_tokens=8) as fake:
        yield fake


def _setup_org(fake: OpenAIFake, *, credit: str = "10", **key_policy):
    owner = User.objects.create_user(email="limits@example.com", password="x-long-password")
    org = organization_create(slug="limits", name="Limits", owner=owner)
    if parse_usd(credit):
        credit_grant(organization=org, amount_nano=parse_usd(credit))
    price_set(
        model_name="gpt-4o",
        input_nano_per_mtok=parse_usd("2.5"),
        output_nano_per_mtok=parse_usd("10"),
    )
    price_set(model_name="other", input_nano_per_mtok=1, output_nano_per_mtok=1)
    channel_add(
        name="up", kind="openai", base_url=fake.base_url, models={"gpt-4o": "gpt-4o", "other": "x"}
    )
    _key, clear = key_create(organization=org, name="limited", **key_policy)
    return org, clear


def _server_env() -> dict[str, str]:
    return {"DATABASE_URL": database_url_for_subprocess(), "REDIS_URL": os.environ["REDIS_URL"]}


async def _burst(url: str, key: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{url}/v1/chat/completions",
                    json=BODY,
                    headers={"Authorization": f"Bearer {key}"},
                )
                for _ in range(count)
            )
        )


def _one_after_another(url: str, key: str, bodies: list[dict]) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    return [
        httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        for body in bodies
    ]


def _away_from_a_window_edge(margin: float = 10.0) -> None:
    """Limits are fixed windows of one clock minute: a burst that straddled two windows
    would rightly get ten through. Start it well inside one."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.5)  # waiting for the clock itself, not for a condition


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_key_at_5_rpm_gets_exactly_5_of_20_across_two_processes(fake_upstream):
    _org, key = _setup_org(fake_upstream, rpm=5)
    with real200_server(workers=2, env=_server_env()) as server:
        _away_from_a_window_edge()
        answers = asyncio.run(_burst(server.url, key, 20))
        after = httpx.post(
            f"{server.url}/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {key}"},
        )
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 5, statuses
    assert statuses.count(429) == 15
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert "5 requests per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    remaining = sorted(
        int(answer.headers["x-ratelimit-remaining-requests"])
        for answer in answers
        if answer.status_code == 200
    )
    assert remaining == [0, 1, 2, 3, 4]  # each success saw the count go down by one
    assert all(answer.headers["x-ratelimit-limit-requests"] == "5" for answer in answers)
    assert after.status_code == 429
    assert len(fake_upstream.calls) == 5  # a 429 never reaches the upstream
    assert Transfer.objects.filter(kind="charge").count() == 5  # and is never charged


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_two_processes_spending_allowances_never_pass_a_keys_limit_together(fake_upstream):
    """At 100 requests a minute each process spends shares of 5 in memory (see
    apps.keys.limits._Allowances): waves of calls across two processes get no more than
    the limit, and no fewer than the limit less a share per process."""
    _org, key = _setup_org(fake_upstream, rpm=100)
    with real200_server(workers=2, env=_server_env()) as server:
        _away_from_a_window_edge(margin=20.0)
        answers = []
        for _wave in range(15):
            answers += asyncio.run(_burst(server.url, key, 10))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert 100 - 2 * 5 <= statuses.count(200) <= 100, statuses
    assert len(fake_upstream.calls) == statuses.count(200)
    assert Transfer.objects.filter(kind="charge").count() == statuses.count(200)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_tokens_per_minute_stop_a_key_and_headers_show_them(fake_upstream):
    # Each call reserves its prompt (8 tokens here) and max_tokens (5); a 40-tpm key fits 3.
    _org, key = _setup_org(fake_upstream, tpm=40)
    with real200_server(workers=2, env=_server_env()) as server:
        _away_from_a_window_edge()
        answers = _one_after_another(server.url, key, [BODY] * 4)
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    first = answers[0]
    assert first.headers["x-ratelimit-limit-tokens"] == "40"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 40
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")
    refused = answers[3]
    assert refused.status_code == 429
    assert "40 tokens per minute" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_rate_limited_call_holds_nothing_and_a_refused_key_writes_no_more_holds(
    fake_upstream,
):
    """The limits and the hold run at once: a call refused for its limits releases the
    hold placed beside it. Once refused, the key is checked first for the rest of the
    window, so a client that keeps sending past its limits costs no hold per call."""
    org, key = _setup_org(fake_upstream, rpm=1)
    with real200_server(workers=1, env=_server_env()) as server:
        _away_from_a_window_edge()
        answers = _one_after_another(server.url, key, [BODY] * 4)
    assert [a.status_code for a in answers] == [200, 429, 429, 429]
    statuses = sorted(Hold.objects.values_list("status", flat=True))
    assert statuses == sorted([HoldStatus.SETTLED, HoldStatus.RELEASED])
    account = account_for_organization(organization=org)
    assert account.held_nano == 0
    assert account.balance_nano == parse_usd("10") - Transfer.objects.get(kind="charge").amount_nano


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_calls_for_a_model_that_does_not_exist_count_against_the_limit(fake_upstream):
    _org, key = _setup_org(fake_upstream, rpm=2)
    unknown = [{**BODY, "model": f"no-such-model-{n}"} for n in range(3)]
    with real200_server(workers=1, env=_server_env()) as server:
        _away_from_a_window_edge()
        *answers, real = _one_after_another(server.url, key, [*unknown, BODY])
    assert [a.status_code for a in answers] == [404, 404, 429]
    assert answers[2].json()["error"]["type"] == "rate_limit_exceeded"
    assert real.status_code == 429
    assert fake_upstream.calls == []


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_call_refused_for_money_gives_its_tokens_per_minute_back(fake_upstream):
    # Each call reserves 13 tokens (8 of prompt, 5 of output): a 40-tpm key fits 3.
    org, key = _setup_org(fake_upstream, credit="0", tpm=40)
    with real200_server(workers=1, env=_server_env()) as server:
        _away_from_a_window_edge()
        broke = _one_after_another(server.url, key, [BODY] * 5)
        credit_grant(organization=org, amount_nano=parse_usd("1"))
        funded = _one_after_another(server.url, key, [BODY] * 4)
    assert [a.status_code for a in broke] == [402] * 5
    # The five refused calls kept no tokens.
    assert [a.status_code for a in funded] == [200, 200, 200, 429]
    assert Hold.objects.filter(status=HoldStatus.OPEN).count() == 0


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_each_policy_refusal_has_its_status_type_and_message(fake_upstream):
    org, key = _setup_org(fake_upstream, allowed_models=["gpt-4o"], allowed_ips=["10.0.0.0/8"])
    _k, open_key = key_create(organization=org, name="open")
    _k, budget_key = key_create(organization=org, name="tight", budget_nano=1)
    expired_key, expired = key_create(organization=org, name="old")
    ApiKey.objects.filter(pk=expired_key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with real200_server(workers=2, env=_server_env()) as server:

        def call(clear: str, **changes) -> httpx.Response:
            return httpx.post(
                f"{server.url}/v1/chat/completions",
                json={**BODY, **changes},
                headers={"Authorization": f"Bearer {clear}"},
                timeout=30,
            )

        ip_refused = call(key)
        model_refused = call(open_key)  # the open key may use any model: control case
        budget_refused = call(budget_key)
        expired_refused = call(expired)
    assert ip_refused.status_code == 403
    assert ip_refused.json()["error"]["type"] == "permission_error"
    assert ip_refused.json()["error"]["code"] == "ip_not_allowed"
    assert "127.0.0.1" in ip_refused.json()["error"]["message"]
    assert model_refused.status_code == 200
    assert budget_refused.status_code == 402
    assert "budget" in budget_refused.json()["error"]["message"]
    assert expired_refused.status_code == 401
    assert "expired" in expired_refused.json()["error"]["message"]
    assert len(fake_upstream.calls) == 1


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_key_not_allowed_a_model_gets_403_and_models_lists_only_its_own(fake_upstream):
    _org, key = _setup_org(fake_upstream, allowed_models=["gpt-4o"])
    headers = {"Authorization": f"Bearer {key}"}
    with real200_server(workers=1, env=_server_env()) as server:
        refused = httpx.post(
            f"{server.url}/v1/chat/completions", json={**BODY, "model": "other"}, headers=headers
        )
        listed = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert [model["id"] for model in listed.json()["data"]] == ["gpt-4o"]


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_revoked_key_fails_on_the_next_call_on_every_process(fake_upstream):
    _org, key = _setup_org(fake_upstream)
    with real200_server(workers=2, env=_server_env()) as server:
        warm = asyncio.run(_burst(server.url, key, 8))  # both processes now know the key
        assert {answer.status_code for answer in warm} == {200}
        key_revoke(key=ApiKey.objects.get(key_hash=hash_key(key)))
        time.sleep(1.1)  # the per-process memo lives one second at most: that is the promise
        after = asyncio.run(_burst(server.url, key, 8))
    assert {answer.status_code for answer in after} == {401}
    assert "revoked" in after[0].json()["error"]["message"]


@contextlib.contextmanager
def _redis_address(failure: str) -> Iterator[str]:
    """Where a Redis that fails this way would be: nothing listening (`down`), or a
    listener that takes connections and never answers a command (`silent`)."""
    if failure == "down":
        yield f"redis://127.0.0.1:{free_port()}/0"
        return
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # never accepted
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"


async def test_a_redis_that_never_answers_holds_a_call_up_one_second_not_redis_pys_five(
    settings,
):
    with _redis_address("silent") as redis_url:
        settings.REDIS_URL = redis_url
        counters_forget()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await counters().add([("silent-test", 1, ALWAYS)])
            waited = time.monotonic() - started
            await counters_close()
        finally:
            counters_forget()
    assert 0.9 < waited < 3  # the limiter's own bound (1 s), far from redis-py's 5 s


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("failure", ["down", "silent"])
def test_with_redis_down_or_silent_the_api_still_answers_and_says_so_in_the_log(
    fake_upstream, failure
):
    _org, key = _setup_org(fake_upstream, rpm=5)
    with (
        _redis_address(failure) as redis_url,
        real200_server(
            workers=1, env={"DATABASE_URL": database_url_for_subprocess(), "REDIS_URL": redis_url}
        ) as server,
    ):
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        log = server.log()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert answer.status_code == 200, answer.text
    assert "rate limiter unavailable" in log
    assert re.search(r"^real200_rate_limiter_failures_total [1-9]", metrics, re.MULTILINE)
    assert Transfer.objects.filter(kind="charge").count() == 1  # billing still held
