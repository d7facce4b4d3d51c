"""The rate limiter's counters: Redis's script and the embedded default's in-process copy
answer the same to the same changes."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from apps.keys.limits import ALWAYS, _LocalCounters, _RedisCounters


def _backends() -> list:
    backends = [pytest.param(_LocalCounters, id="local")]
    url = os.environ.get("REDIS_URL")
    redis = pytest.param(
        lambda: _RedisCounters(url),
        id="redis",
        marks=pytest.mark.skipif(not url, reason="needs Redis: set REDIS_URL=redis://…"),
    )
    return [*backends, redis]


@pytest.fixture(params=_backends())
def counters(request):
    return request.param()


def _key() -> str:
    return f"test-counters:{uuid.uuid4().hex}"


def test_counts_up_and_reads_without_creating(counters):
    key, other = _key(), _key()

    async def scenario():
        first = await counters.add([(key, 1, ALWAYS), (other, 0, ALWAYS)])
        second = await counters.add([(key, 1, ALWAYS), (other, 0, ALWAYS)])
        return first, second

    first, second = asyncio.run(scenario())
    assert first == [(1, True), (0, False)]
    assert second == [(2, True), (0, False)]


def test_a_reservation_past_the_limit_adds_nothing(counters):
    key = _key()

    async def scenario():
        return [
            await counters.add([(key, 30, 40)]),
            await counters.add([(key, 20, 40)]),  # 50 > 40: refused, nothing added
            await counters.add([(key, 10, 40)]),  # exactly the limit: admitted
        ]

    assert asyncio.run(scenario()) == [[(30, True)], [(30, False)], [(40, True)]]


def test_a_correction_changes_only_a_counter_that_exists(counters):
    key, gone = _key(), _key()

    async def scenario():
        await counters.add([(key, 30, ALWAYS)])
        return await counters.add([(key, -25, ALWAYS), (gone, -5, ALWAYS)])

    assert asyncio.run(scenario()) == [(5, True), (0, False)]


def test_racing_reservations_never_pass_the_limit(counters):
    key = _key()

    async def scenario():
        answers = await asyncio.gather(*(counters.add([(key, 7, 50)]) for _ in range(20)))
        return [added for [(_count, added)] in answers]

    assert sum(asyncio.run(scenario())) == 7  # 7 x 7 = 49 fit in 50
