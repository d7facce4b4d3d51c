"""Admitting a call: its request counted and its tokens reserved in one step
(apps.keys.limits.call_admit), against the counters the server uses (Redis with
REDIS_URL, else the embedded in-process copy)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

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
