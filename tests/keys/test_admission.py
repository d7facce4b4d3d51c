"""Admitting a call: its request counted and its tokens reserved in one step
(apps.keys.limits.call_admit), against the counters the server uses (Redis with
REDIS_URL, else the embedded in-process copy)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import REGISTRY

from apps.keys import limits
from apps.keys.limits import ALWAYS, LimitExceeded, call_admit, counters
from apps.keys.selectors import KeyGrant

NOW = 1_800_000_030.0  # the middle of a minute: every count below is in one window
_ids = itertools.count(900_000)


@pytest.fixture(autouse=True)
def _clock(monkeypatch) -> None:
    monkeypatch.setattr(limits.time, "time", lambda: NOW)


def _grant(*, rpm: int | None = None, tpm: int | None = None) -> KeyGrant:
    return KeyGrant(
        id=next(_ids),
        organization_id=next(_ids),
        display="sk-real200-…test",
        revoked=False,
        expires_at=None,
        allowed_models=(),
        allowed_ips=(),
        rpm=rpm,
        tpm=tpm,
        budget_nano=None,
        budget_period="total",
        org_rpm=None,
    )


def _count(kind: str, owner: int) -> int:
    key = limits._counter(kind, owner, limits._window(NOW)[0])
    [(count, _added)] = asyncio.run(counters().add([(key, 0, ALWAYS)]))
    return count


def test_a_call_counts_its_request_and_reserves_its_tokens():
    grant = _grant(rpm=5, tpm=100)
    admission = asyncio.run(call_admit(grant, 30))
    assert (admission.requests.remaining, admission.tokens.remaining) == (4, 70)
    assert admission.reserved_tokens == 30
    assert admission.headers()["x-ratelimit-remaining-tokens"] == "70"
    assert (_count("rpm-key", grant.id), _count("tpm", grant.id)) == (1, 30)


def test_a_call_past_its_requests_limit_is_refused_and_keeps_no_tokens():
    grant = _grant(rpm=1, tpm=100)
    asyncio.run(call_admit(grant, 10))
    with pytest.raises(LimitExceeded, match="1 requests per minute"):
        asyncio.run(call_admit(grant, 10))
    assert _count("tpm", grant.id) == 10  # the refused call's 10 were given back


def test_a_call_whose_tokens_do_not_fit_is_refused_but_its_request_counts():
    grant = _grant(rpm=10, tpm=50)
    asyncio.run(call_admit(grant, 40))
    with pytest.raises(LimitExceeded, match="50 tokens per minute") as refused:
        asyncio.run(call_admit(grant, 20))
    assert refused.value.admission.tokens.remaining == 10
    assert (_count("rpm-key", grant.id), _count("tpm", grant.id)) == (2, 40)


@pytest.mark.redis
def test_calls_admitted_at_once_share_one_run_and_are_counted_in_arrival_order():
    """Concurrent calls' counts go to Redis in one run of the script, applied in the
    order the calls came: exactly as if each had been sent alone, one after another."""
    grant = _grant(rpm=3, tpm=100)

    def runs() -> tuple[float, float]:
        labels = {"statement": "counters"}
        return (
            REGISTRY.get_sample_value("real200_db_statement_rows_count", labels) or 0.0,
            REGISTRY.get_sample_value("real200_db_statement_rows_sum", labels) or 0.0,
        )

    async def five_at_once():
        return await asyncio.gather(
            *(call_admit(grant, 30) for _ in range(5)), return_exceptions=True
        )

    before = runs()
    answers = asyncio.run(five_at_once())
    statements, calls = (after - start for after, start in zip(runs(), before, strict=True))
    assert calls >= 5
    assert statements < calls
    admitted = [a for a in answers if not isinstance(a, BaseException)]
    assert [(a.requests.remaining, a.tokens.remaining) for a in admitted] == [
        (2, 70),
        (1, 40),
        (0, 10),
    ]
    assert all(isinstance(a, LimitExceeded) for a in answers[3:])
    assert (_count("rpm-key", grant.id), _count("tpm", grant.id)) == (5, 90)  # refusals count
