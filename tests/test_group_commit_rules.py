"""GroupCommit's own rules, with statements that only record what they were given: how
rows are grouped, split, answered and failed, whatever the database behind them."""

from __future__ import annotations

import asyncio

import pytest

from config.asyncdb import GroupCommit


class Statements:
    """`one` and `many` for a GroupCommit: each answers a row with its double, after a
    round trip's pause, and records the groups it was sent."""

    def __init__(self, *, failing: int | None = None) -> None:
        self.groups: list[list[int]] = []
        self.failing = failing  # a row that breaks any statement it is in

    async def one(self, row: int) -> int:
        self.groups.append([row])
        await asyncio.sleep(0.01)
        if row == self.failing:
            raise ValueError(f"row {row}")
        return row * 2

    async def many(self, rows: list[int]) -> list[int]:
        self.groups.append(list(rows))
        await asyncio.sleep(0.01)
        if self.failing in rows:
            raise ValueError(f"row {self.failing}")
        return [row * 2 for row in rows]


def _run_together(group: GroupCommit, rows: list[int]) -> list:
    async def together() -> list:
        return await asyncio.gather(*map(group.submit, rows), return_exceptions=True)

    return asyncio.run(together())


def test_rows_that_arrive_while_statements_are_in_flight_go_together_in_order():
    statements = Statements()
    group = GroupCommit("test", one=statements.one, many=statements.many, flights=2)

    async def arrivals() -> list:
        first = asyncio.ensure_future(group.submit(0))  # alone: nothing in flight
        await asyncio.sleep(0.002)  # its statement is in flight now
        later = [asyncio.ensure_future(group.submit(row)) for row in range(1, 8)]
        return await asyncio.gather(first, *later)

    assert asyncio.run(arrivals()) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert statements.groups == [[0], [1, 2, 3, 4, 5, 6, 7]]


def test_a_statement_takes_at_most_its_rows_and_the_rest_go_in_the_next():
    statements = Statements()
    group = GroupCommit("test", one=statements.one, many=statements.many, most_rows=3)
    assert _run_together(group, list(range(7))) == [row * 2 for row in range(7)]
    assert statements.groups == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_row_that_breaks_its_group_fails_alone_and_the_others_are_answered():
    statements = Statements(failing=2)
    group = GroupCommit("test", one=statements.one, many=statements.many)
    answers = _run_together(group, [1, 2, 3])
    assert answers[0] == 2
    assert answers[2] == 6
    assert isinstance(answers[1], ValueError)
    assert statements.groups[0] == [1, 2, 3]
    assert sorted(statements.groups[1:]) == [[1], [2], [3]]  # each tried alone


def test_without_retrying_alone_a_failed_group_fails_every_row_at_once():
    statements = Statements(failing=2)
    group = GroupCommit("test", one=statements.one, many=statements.many, alone=False)
    answers = _run_together(group, [1, 2, 3])
    assert all(isinstance(answer, ValueError) for answer in answers)
    assert statements.groups == [[1, 2, 3]]  # no second round trip to a failing server


def test_a_caller_that_leaves_does_not_stop_its_row_nor_the_others():
    statements = Statements()
    group = GroupCommit("test", one=statements.one, many=statements.many)

    async def one_leaves() -> list:
        callers = [asyncio.ensure_future(group.submit(row)) for row in range(4)]
        await asyncio.sleep(0)  # the rows are queued and their statement starts
        callers[1].cancel()
        return await asyncio.gather(*callers, return_exceptions=True)

    answers = asyncio.run(one_leaves())
    assert isinstance(answers[1], asyncio.CancelledError)
    assert [answers[0], answers[2], answers[3]] == [0, 4, 6]
    assert statements.groups == [[0, 1, 2, 3]]  # the row was applied all the same


def test_a_caller_cancelled_while_its_row_is_in_flight_can_still_read_its_result():
    """A row's future is not cancelled with the task that awaits it: the task's
    CancelledError comes once the result is in, and the result (a hold to give back) is
    there to read."""
    statements = Statements()
    group = GroupCommit("test", one=statements.one, many=statements.many)

    async def leave_while_in_flight() -> tuple[bool, int, bool]:
        landing = group.enqueue(21)
        seen: list[int] = []

        async def caller() -> None:
            try:
                await landing
            except asyncio.CancelledError:
                seen.append(landing.result())
                raise

        waiting = asyncio.ensure_future(caller())
        await asyncio.sleep(0)  # the caller waits; the row's statement is in flight
        waiting.cancel()
        await asyncio.sleep(0)
        still_waiting = not waiting.done()  # until the statement answers
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return still_waiting, seen[0], landing.cancelled()

    assert asyncio.run(leave_while_in_flight()) == (True, 42, False)
    assert statements.groups == [[21]]


@pytest.mark.parametrize("flights", [1, 3])
def test_no_more_statements_are_in_flight_than_allowed(flights):
    in_flight, most = 0, 0

    async def one(row: int) -> int:
        return (await many([row]))[0]

    async def many(rows: list[int]) -> list[int]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return rows

    group = GroupCommit("test", one=one, many=many, flights=flights, most_rows=1)
    assert _run_together(group, list(range(10))) == list(range(10))
    assert most == flights
