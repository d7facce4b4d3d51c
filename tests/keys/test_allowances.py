"""Allowances (apps.keys.limits._Allowances): a counter far from its limit is spent from a
share each process reserved in Redis ahead, with no round trip per call, and the
processes together still never count past a limit."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from apps.keys import limits
from apps.keys.limits import ALWAYS, LimitExceeded, call_admit, call_admit_start, counters
from tests.keys.test_admission import NOW, _clock, _grant  # noqa: F401 - _clock is a fixture

pytestmark = pytest.mark.redis


async def _count(kind: str, owner: int) -> int:
    key = limits._counter(kind, owner, limits._window(NOW)[0])
    [(count, _added)] = await counters().add([(key, 0, ALWAYS)])
    return count


async def _reservations_landed(allowances: limits._Allowances) -> None:
    await asyncio.gather(*list(allowances._tasks))


async def _admitted(pending: limits.PendingAdmission) -> bool:
    try:
        await pending.admission()
    except LimitExceeded:
        return False
    return True


def test_a_call_far_from_its_limits_is_admitted_from_the_allowance_with_no_round_trip():
    grant = _grant(rpm=1000, tpm=100_000)

    async def scenario():
        first = call_admit_start(grant, 100)
        assert not first.counted.done()  # nothing reserved yet: counted in Redis
        await first.admission()
        await _reservations_landed(limits._allowances)
        second = call_admit_start(grant, 100)
        assert second.counted.done()  # spent from the allowance, in memory
        admission = await second.admission()
        counts = await _count("rpm-key", grant.id), await _count("tpm", grant.id)
        return admission, counts

    admission, counts = asyncio.run(scenario())
    # The headers say what a call counted in Redis would have been told.
    assert (admission.requests.remaining, admission.tokens.remaining) == (998, 99_800)
    assert admission.headers()["x-ratelimit-remaining-requests"] == "998"
    assert admission.reserved_tokens == 100
    # Redis holds the first call and the process's whole share: a twentieth of each limit.
    assert counts == (1 + 50, 100 + 5_000)


def test_unused_tokens_of_a_settled_call_go_back_to_the_allowance_not_to_redis():
    grant = _grant(rpm=1000, tpm=100_000)

    async def scenario():
        await call_admit(grant, 100)
        await _reservations_landed(limits._allowances)
        admission = await call_admit(grant, 1_000)
        before = await _count("tpm", grant.id)
        await limits.tokens_correct(admission, 30)  # it used 30 of the 1,000 it reserved
        after = await _count("tpm", grant.id)
        return before, after, await call_admit(grant, 100)

    before, after, following = asyncio.run(scenario())
    assert after == before  # given back to this process's share
    assert following.tokens.remaining == 100_000 - 100 - 30 - 100


def test_a_limit_too_small_to_share_is_counted_in_redis_call_by_call():
    grant = _grant(rpm=60, tpm=100_000)  # a share of 3 requests covers too few calls

    async def scenario():
        await call_admit(grant, 10)
        await asyncio.sleep(0.05)
        pending = call_admit_start(grant, 10)
        counted_in_redis = not pending.counted.done()
        await pending.admission()
        return counted_in_redis, await _count("rpm-key", grant.id)

    assert asyncio.run(scenario()) == (True, 2)


def test_two_processes_sharing_a_limit_never_admit_past_it_together(monkeypatch):
    """Two processes' allowances (two `_Allowances`) take turns with the calls of one key
    at 100 requests a minute. Shares stop at half the limit; past it every call is counted
    in Redis. What one process keeps unspent of its last share may be refused to the other:
    at most a share (5) per process."""
    grant = _grant(rpm=100, tpm=10_000_000)
    processes = [limits._Allowances(), limits._Allowances()]

    async def scenario():
        admitted = from_allowance = 0
        for call in range(150):
            process = processes[call % 2]
            monkeypatch.setattr(limits, "_allowances", process)
            pending = call_admit_start(grant, 10)
            from_allowance += pending.counted.done()
            admitted += await _admitted(pending)
            await _reservations_landed(process)
        return admitted, from_allowance

    admitted, from_allowance = asyncio.run(scenario())
    assert 100 - 2 * 5 <= admitted <= 100
    assert from_allowance >= 40  # the first half of the limit went without round trips
    requests = limits._counter("rpm-key", grant.id, limits._window(NOW)[0])
    assert all(p._by_counter[requests].closed for p in processes)  # past half: exact


def test_past_half_its_limit_a_counter_gives_no_shares_and_the_unspent_goes_back():
    grant = _grant(rpm=100, tpm=10_000_000)
    key = limits._counter("rpm-key", grant.id, limits._window(NOW)[0])

    async def scenario():
        await call_admit(grant, 10)  # counted in Redis (1), and a share of 5 asked for (6)
        await _reservations_landed(limits._allowances)
        await counters().add([(key, 40, ALWAYS)])  # other processes' calls meanwhile: 46
        for _ in range(4):  # from the share; the last leaves 1 and asks for more
            assert call_admit_start(grant, 10).counted.done()
        await _reservations_landed(limits._allowances)  # 46 + 5 would pass 50: refused
        return limits._allowances._by_counter[key], await _count("rpm-key", grant.id)

    allowance, count = asyncio.run(scenario())
    assert allowance.closed
    assert allowance.left == 0
    assert count == 45  # 5 calls and the others' 40: the unspent 1 went back


def test_a_reservation_that_failed_is_asked_again_a_second_later(monkeypatch):
    grant = _grant(rpm=1000, tpm=100_000)
    working = counters()
    monkeypatch.setattr(limits, "_counters", limits._RedisCounters("redis://127.0.0.1:9/0"))
    key = limits._counter("rpm-key", grant.id, limits._window(NOW)[0])

    async def scenario():
        await call_admit(grant, 100)  # Redis away: served anyway (fails open)
        await _reservations_landed(limits._allowances)
        allowance = limits._allowances._by_counter[key]
        assert (allowance.left, allowance.refilling.done()) == (0, True)
        limits._counters = working  # Redis is back...
        await call_admit(grant, 100)
        await _reservations_landed(limits._allowances)
        assert allowance.left == 0  # ...but within the second, not asked again
        for each in limits._allowances._by_counter.values():  # a second later
            each.retry_at = 0.0
        await call_admit(grant, 100)
        await _reservations_landed(limits._allowances)
        return allowance.left, call_admit_start(grant, 100).counted.done()

    assert asyncio.run(scenario()) == (50, True)


def test_a_limit_lowered_mid_window_applies_at_once_not_after_the_old_share():
    grant = _grant(rpm=1000, tpm=10_000_000)
    lowered = dataclasses.replace(grant, rpm=10)  # the same key, its limit just changed

    async def scenario():
        await call_admit(grant, 10)
        await _reservations_landed(limits._allowances)  # a share of 50 is in: 51 counted
        await call_admit(grant, 10)  # from the share
        admitted = 0
        for _ in range(20):
            pending = call_admit_start(lowered, 10)
            assert not pending.counted.done()  # counted in Redis, against the new limit
            admitted += await _admitted(pending)
            await _reservations_landed(limits._allowances)
        return admitted, await _count("rpm-key", grant.id)

    admitted, count = asyncio.run(scenario())
    assert admitted == 10 - 2  # the two calls before the change count
    assert count == 2 + 20  # the old share's 49 unspent went back; every request counts


def test_with_rate_limit_shares_0_every_call_is_counted_in_redis(settings):
    settings.RATE_LIMIT_SHARES = 0
    grant = _grant(rpm=1000, tpm=100_000)

    async def scenario():
        counted_in_redis = []
        for _ in range(3):
            pending = call_admit_start(grant, 100)
            counted_in_redis.append(not pending.counted.done())
            await pending.admission()
            await _reservations_landed(limits._allowances)
        return counted_in_redis, await _count("rpm-key", grant.id)

    assert asyncio.run(scenario()) == ([True, True, True], 3)
