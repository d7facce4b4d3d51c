"""Concurrent lookups of one expired memo share a single query."""

from __future__ import annotations

import asyncio

from config.asyncdb import SingleFlight


def test_concurrent_callers_share_one_lookup_and_a_cancelled_one_does_not_stop_it():
    lookups = []

    async def lookup() -> str:
        lookups.append(1)
        await asyncio.sleep(0.05)
        return "route"

    async def scenario() -> list:
        flight = SingleFlight()
        callers = [asyncio.ensure_future(flight.run("gpt-4o", lookup)) for _ in range(50)]
        await asyncio.sleep(0.01)
        callers[0].cancel()  # its client left: the others still get the answer
        answers = await asyncio.gather(*callers, return_exceptions=True)
        again = await flight.run("gpt-4o", lookup)  # done: the next caller looks up anew
        return [*answers, again]

    answers = asyncio.run(scenario())
    assert isinstance(answers[0], asyncio.CancelledError)
    assert answers[1:] == ["route"] * 50
    assert len(lookups) == 2
