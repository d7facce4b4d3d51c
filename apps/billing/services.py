"""Every movement of money: transfers between accounts, and holds on a customer's balance.

Locking rule (it is what keeps concurrent calls from deadlocking): within a transaction,
account rows are locked customer accounts first, then system accounts, each group in
primary-key order. A revenue account is a row many charges touch, so it is locked last
and held for as short a time as possible; and there are several (`revenue_account`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.mail import send_mail
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone
from django.utils.translation import gettext as _

from apps.billing.models import Account, AccountKind, Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import (
    NANO_PER_CENT,
    NANO_PER_USD,
    Nano,
    Rates,
    affordable_completion_tokens,
    format_usd,
    worst_case_cost_nano,
)
from apps.keys.models import ApiKey, BudgetPeriod
from apps.tenancy.models import Membership, Organization, Role, User
from config.asyncdb import (
    GroupCommit,
    as_columns,
    db_step,
    fetch_all,
    fetch_one,
    fetch_one_available,
)

logger = logging.getLogger(__name__)

# A low-balance threshold above this is a typo, not a plan (and keeps the column far from
# its 64-bit limit).
LOW_BALANCE_THRESHOLD_MAX_NANO = 1_000_000 * NANO_PER_USD


class InsufficientFunds(Exception):
    """The money is not there: a customer's spendable balance would go below zero."""

    def __init__(self, *, available_nano: Nano, needed_nano: Nano, limited_by: str = "balance"):
        super().__init__(f"{limited_by} affords {available_nano} nano-USD, {needed_nano} needed")
        self.available_nano = available_nano
        self.needed_nano = needed_nano
        self.limited_by = limited_by  # "balance" or "budget"


def account_for_organization(*, organization: Organization) -> Account:
    account, _ = Account.objects.get_or_create(
        organization=organization, defaults={"kind": AccountKind.CUSTOMER}
    )
    return account


# System accounts never change identity once created; each process remembers them so a
# settlement does not look the revenue account up on every call. Only pk and kind of the
# remembered row are used (balances are always changed with F() in the database).
_system_accounts: dict[tuple[str, int], Account] = {}

# Every charge credits a revenue account in the statement that debits the customer, so
# one revenue row made the settlements of all organizations wait for each other's lock
# (bench, 8 organizations at 32 concurrent calls: 4.8 sessions waiting on a lock on
# average, 0.7 without that update, and a tenth fewer calls per second). Charges are
# spread over this many revenue accounts by organization: one organization's charges
# queue on its own account's row anyway, so they lose nothing by sharing one revenue row.
REVENUE_SHARDS = 16


_customer_account_ids: dict[int, int] = {}


def account_id_for_organization(*, organization_id: int) -> int:
    """The customer account of an organization (created on first use), remembered per
    process: the hot path needs only its id, which never changes."""
    account_id = _customer_account_ids.get(organization_id)
    if account_id is None:
        try:
            account, _ = Account.objects.get_or_create(
                organization_id=organization_id, defaults={"kind": AccountKind.CUSTOMER}
            )
        except IntegrityError:  # a concurrent first call created it
            account = Account.objects.get(organization_id=organization_id)
        account_id = _customer_account_ids[organization_id] = account.pk
    return account_id


def system_account(kind: AccountKind, shard: int = 0) -> Account:
    if kind == AccountKind.CUSTOMER:
        raise ValueError("customer accounts belong to an organization")
    account = _system_accounts.get((kind, shard))
    if account is not None:
        return account
    try:
        account, _ = Account.objects.get_or_create(kind=kind, shard=shard, organization=None)
    except IntegrityError:  # created by a concurrent caller between our get and create
        account = Account.objects.get(kind=kind, shard=shard, organization=None)
    _system_accounts[(kind, shard)] = account
    return account


def revenue_shard(organization_id: int) -> int:
    return organization_id % REVENUE_SHARDS


def revenue_account(organization_id: int) -> Account:
    """The revenue account that this organization's charges are credited to."""
    return system_account(AccountKind.REVENUE, shard=revenue_shard(organization_id))


def remembered_system_account_id(kind: AccountKind, shard: int = 0) -> int | None:
    """The system account's id if this process knows it already (async code cannot ask
    the ORM)."""
    account = _system_accounts.get((kind, shard))
    return account.pk if account is not None else None


def system_accounts_forget() -> None:
    """Drop the remembered accounts (tests roll them back between cases)."""
    _system_accounts.clear()
    _customer_account_ids.clear()


def _lock_order(account: Account) -> tuple[bool, int]:
    return (account.kind != AccountKind.CUSTOMER, account.pk)


def transfer_post(
    *,
    from_account: Account,
    to_account: Account,
    amount_nano: Nano,
    kind: TransferKind,
    memo: str = "",
    api_key_id: int | None = None,
    created_by: User | None = None,
    idempotency_key: str | None = None,
) -> Transfer:
    """Move `amount_nano` between two accounts: the only way a balance changes.

    Updates both cached balances and inserts the transfer in one transaction: the
    caller's when there is one (no savepoint: two round trips saved on every settlement),
    else its own. The accounts are updated first, in the lock order above, so the one check
    that can refuse (a customer's debit; customers come first) runs before anything is
    written: InsufficientFunds then leaves the caller's transaction usable and nothing
    written. Raises IntegrityError on a reused `idempotency_key`: callers that expect
    retries use `transfer_post_once`.
    """
    if amount_nano <= 0:
        raise ValueError("a transfer moves a positive amount")
    if from_account.pk == to_account.pk:
        raise ValueError("a transfer moves money between two different accounts")
    in_transaction = transaction.get_connection().in_atomic_block
    with nullcontext() if in_transaction else transaction.atomic():
        for account in sorted((from_account, to_account), key=_lock_order):
            if account.pk == to_account.pk:
                Account.objects.filter(pk=account.pk).update(
                    balance_nano=F("balance_nano") + amount_nano
                )
                continue
            debited = (
                Account.objects.filter(pk=account.pk)
                .filter(
                    ~Q(kind=AccountKind.CUSTOMER)
                    | Q(balance_nano__gte=F("held_nano") + amount_nano)
                )
                .update(balance_nano=F("balance_nano") - amount_nano)
            )
            if not debited:
                fresh = Account.objects.get(pk=account.pk)
                raise InsufficientFunds(
                    available_nano=fresh.available_nano, needed_nano=amount_nano
                )
        return Transfer.objects.create(
            from_account=from_account,
            to_account=to_account,
            amount_nano=amount_nano,
            kind=kind,
            memo=memo[:500],
            api_key_id=api_key_id,
            created_by=created_by,
            idempotency_key=idempotency_key,
        )


def transfer_post_once(*, idempotency_key: str, **fields) -> tuple[Transfer, bool]:
    """`transfer_post` for an event that may be delivered more than once.

    The unique `idempotency_key` makes the second delivery a no-op: it returns the first
    transfer and False, without an error and without moving money again, even when two
    deliveries race (the loser's insert fails on the constraint inside a savepoint).
    """
    existing = Transfer.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            return transfer_post(idempotency_key=idempotency_key, **fields), True
    except IntegrityError:
        existing = Transfer.objects.filter(idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return existing, False


def credit_grant(
    *,
    organization: Organization,
    amount_nano: Nano,
    memo: str = "",
    created_by: User | None = None,
    source: AccountKind = AccountKind.PROMOTIONS,
    kind: TransferKind = TransferKind.GRANT,
    idempotency_key: str | None = None,
) -> Transfer:
    """Credit an organization from a system account (an operator grant, a top-up)."""
    return transfer_post(
        from_account=system_account(source),
        to_account=account_for_organization(organization=organization),
        amount_nano=amount_nano,
        kind=kind,
        memo=memo,
        created_by=created_by,
        idempotency_key=idempotency_key,
    )


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A key's spending limit: `budget_nano` (None: no limit) over its `period`."""

    key_id: int
    budget_nano: int | None
    period: str = BudgetPeriod.LIFETIME


def key_spent_nano(*, key_id: int, period: str, now: datetime) -> Nano:
    """What a key has spent in its budget window, from its charges: a query, so there is
    no counter that a job must remember to reset at the start of a month."""
    charges = Transfer.objects.filter(api_key_id=key_id, kind=TransferKind.CHARGE)
    if period == BudgetPeriod.MONTHLY:
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        charges = charges.filter(created_at__gte=month_start)
    return charges.aggregate(total=Sum("amount_nano"))["total"] or 0


def _key_budget_left_nano(key: KeyBudget) -> Nano:
    """Budget minus spend in the window minus open holds, with the key row locked (SELECT
    … FOR UPDATE) so two calls cannot both fit into the budget's last dollar. Runs inside
    the caller's transaction."""
    ApiKey.objects.select_for_update().filter(pk=key.key_id).first()
    on_hold = (
        Hold.objects.filter(api_key_id=key.key_id, status=HoldStatus.OPEN).aggregate(
            total=Sum("amount_nano")
        )["total"]
        or 0
    )
    spent = key_spent_nano(key_id=key.key_id, period=key.period, now=timezone.now())
    return key.budget_nano - spent - on_hold


def _open_hold(
    *,
    account_id: int,
    key_id: int | None,
    request_id: str,
    amount_nano: Nano,
    expires_at: datetime,
    available_nano: Nano,
) -> Hold:
    """Reserve by one conditional UPDATE: any number of concurrent calls, on any number of
    processes, cannot reserve more than the spendable balance. `available_nano` is what the
    caller read the balance to afford, reported if the reservation is refused."""
    placed = Account.objects.filter(
        pk=account_id, balance_nano__gte=F("held_nano") + amount_nano
    ).update(held_nano=F("held_nano") + amount_nano)
    if not placed:
        raise InsufficientFunds(available_nano=available_nano, needed_nano=amount_nano)
    return Hold.objects.create(
        account_id=account_id,
        api_key_id=key_id,
        request_id=request_id,
        amount_nano=amount_nano,
        expires_at=expires_at,
    )


@dataclass(frozen=True)
class CallQuote:
    """What a call may cost at most: its prompt, and the output it asks for (or None: as
    much as the money affords, up to `output_cap`), `n` times over."""

    prompt_tokens: int
    max_tokens: int | None
    output_cap: int
    n: int
    rates: Rates
    min_reply_tokens: int

    @property
    def worst_case_tokens(self) -> int:
        """Prompt and the most output the call may produce: what tokens-per-minute counts."""
        return self.prompt_tokens + (self.max_tokens or self.output_cap) * self.n

    def cost_with(self, output_tokens: int) -> Nano:
        """The most that the prompt and `output_tokens` of output for each of the `n`
        choices may cost, however the upstream splits the prompt between input, cache
        reads and cache writes: what the hold covers. `affordable_completion_tokens`, which
        the careful path caps a call with, is its exact inverse."""
        return worst_case_cost_nano(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=output_tokens * self.n,
            rates=self.rates,
        )


class CallNotAffordable(InsufficientFunds):
    """The money does not cover the call; `affordable_tokens` says what it would cover."""

    def __init__(self, *, affordable_tokens: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.affordable_tokens = max(affordable_tokens, 0)


def hold_place_for_call(
    *,
    account_id: int,
    key: KeyBudget | None,
    request_id: str,
    expires_at: datetime,
    quote: CallQuote,
) -> tuple[Hold, int]:
    """Hold the worst-case cost of one completion call; returns the hold and the output
    limit the call runs with.

    With no `max_tokens`, the call is capped at what the balance (and the key's budget)
    affords, down to `min_reply_tokens`; below that, or when a given `max_tokens` does not
    fit, CallNotAffordable says how many output tokens the money would cover.

    Most calls fit their balance with room to spare: on PostgreSQL they are held by one
    statement (see `_HOLD_IF_COVERED`). A call the money may not cover takes the careful
    path, which reads the balance and works out what it affords.
    """
    worst = _WorstCase.of(account_id, key, request_id, expires_at, quote)
    if not _budgeted(key) and connection.vendor == "postgresql":
        hold = _hold_if_covered(worst)
        if hold is not None:
            return hold, worst.tokens
    return _hold_carefully(key=key, quote=quote, worst=worst)


def hold_start_for_call(
    *,
    organization_id: int,
    key: KeyBudget | None,
    request_id: str,
    expires_at: datetime,
    quote: CallQuote,
) -> PendingHold:
    """`hold_place_for_call` for the organization's account, from async code, in two
    parts: this one sends the call's row with the next hold statement (on the event
    loop's own connection) when it can, nearly always, and returns at once;
    `PendingHold.hold` waits for the hold. Anything else (a new account, a key with a
    budget, the careful path, another database) runs in a worker thread. A caller with
    other work to start meanwhile (the call's rate limits) starts it with no task around
    either."""
    account_id = _customer_account_ids.get(organization_id)
    if account_id is None:
        return PendingHold.in_steps(
            _hold_for_new_account(organization_id, key, request_id, expires_at, quote)
        )
    return _hold_start_for_account(account_id, key, request_id, expires_at, quote)


def _hold_start_for_account(
    account_id: int, key: KeyBudget | None, request_id: str, expires_at: datetime, quote: CallQuote
) -> PendingHold:
    if _budgeted(key) or not fetch_one_available():
        return PendingHold.in_steps(
            db_step(
                hold_place_for_call,
                account_id=account_id,
                key=key,
                request_id=request_id,
                expires_at=expires_at,
                quote=quote,
            )
        )
    worst = _WorstCase.of(account_id, key, request_id, expires_at, quote)
    return PendingHold.if_covered(worst, key, quote)


async def _hold_for_new_account(
    organization_id: int,
    key: KeyBudget | None,
    request_id: str,
    expires_at: datetime,
    quote: CallQuote,
) -> tuple[Hold, int]:
    account_id = await db_step(account_id_for_organization, organization_id=organization_id)
    return await _hold_start_for_account(account_id, key, request_id, expires_at, quote).hold()


class PendingHold:
    """A call's hold, asked for. `hold` waits for it; `taken` says, once every step
    started has ended, what was placed (for a call that will not run, to give back).

    The one statement's answer is awaited directly (a `Landing`, which the caller's
    cancellation cannot lose). Other steps run in a task of their own, which the
    caller's cancellation does not cancel: the hold they place is not lost either."""

    def __init__(self) -> None:
        self._key: KeyBudget | None = None
        self._quote: CallQuote | None = None
        self._worst: _WorstCase | None = None
        self._asked_at: datetime | None = None
        self._covered: asyncio.Future[int | None] | None = None  # the one statement's answer
        self._steps: asyncio.Future[tuple[Hold, int]] | None = None

    @classmethod
    def if_covered(cls, worst: _WorstCase, key: KeyBudget | None, quote: CallQuote) -> PendingHold:
        """Hold the whole worst case by the one statement; if the balance does not
        cover it, `hold` goes the careful way."""
        pending = cls()
        pending._key, pending._quote = key, quote
        pending._worst, pending._asked_at = worst, timezone.now()
        pending._covered = _hold_statements.enqueue(worst.params(pending._asked_at))
        return pending

    @classmethod
    def in_steps(cls, steps: Coroutine[Any, Any, tuple[Hold, int]]) -> PendingHold:
        pending = cls()
        pending._steps = asyncio.ensure_future(steps)
        return pending

    async def hold(self) -> tuple[Hold, int]:
        if self._steps is None:
            hold_id = await self._covered
            if hold_id is not None:
                return self._worst.placed(hold_id, self._asked_at), self._worst.tokens
            self._steps = asyncio.ensure_future(
                db_step(_hold_carefully, key=self._key, quote=self._quote, worst=self._worst)
            )
        return await asyncio.shield(self._steps)

    async def taken(self) -> Hold | None:
        for step in (self._covered, self._steps):
            if step is not None:
                await asyncio.wait([step])
        if self._steps is not None:
            return None if self._steps.exception() else self._steps.result()[0]
        if self._covered.exception() or self._covered.result() is None:
            return None
        return self._worst.placed(self._covered.result(), self._asked_at)


def _budgeted(key: KeyBudget | None) -> bool:
    return key is not None and key.budget_nano is not None


@dataclass(frozen=True, slots=True)
class _WorstCase:
    """A call's whole worst case, to be held: for whom, and how much."""

    account_id: int
    key_id: int | None
    request_id: str
    expires_at: datetime
    tokens: int  # the output the call runs with if the money covers it all
    amount_nano: Nano  # the cost of the prompt and that output

    @classmethod
    def of(
        cls,
        account_id: int,
        key: KeyBudget | None,
        request_id: str,
        expires_at: datetime,
        quote: CallQuote,
    ) -> _WorstCase:
        tokens = quote.max_tokens or quote.output_cap
        key_id = key.key_id if key else None
        return cls(account_id, key_id, request_id, expires_at, tokens, quote.cost_with(tokens))

    def params(self, now: datetime) -> dict:
        """The parameters of `_HOLD_IF_COVERED`."""
        return {
            "account": self.account_id,
            "key": self.key_id,
            "request": self.request_id,
            "amount": self.amount_nano,
            "now": now,
            "expires": self.expires_at,
            "open": HoldStatus.OPEN.value,
        }

    def placed(self, hold_id: int, now: datetime) -> Hold:
        """The Hold that `_HOLD_IF_COVERED` inserted, from the id it returned."""
        hold = Hold(
            id=hold_id,
            account_id=self.account_id,
            api_key_id=self.key_id,
            request_id=self.request_id,
            amount_nano=self.amount_nano,
            status=HoldStatus.OPEN,
            created_at=now,
            expires_at=self.expires_at,
        )
        hold._state.adding = False  # it is in the database: saving it would update it
        return hold


def _hold_carefully(
    *, key: KeyBudget | None, quote: CallQuote, worst: _WorstCase
) -> tuple[Hold, int]:
    """What `hold_place_for_call` does when the one statement did not hold the call (or
    cannot be used): in a transaction, check the key's budget, then hold the whole worst
    case if it fits or work out what the money affords."""
    with transaction.atomic():
        budget_left = _key_budget_left_nano(key) if _budgeted(key) else None
        covered = budget_left is not None and budget_left >= worst.amount_nano
        if covered and connection.vendor == "postgresql":
            hold = _hold_if_covered(worst)
            if hold is not None:
                return hold, worst.tokens
        return _hold_what_is_affordable(worst=worst, quote=quote, budget_left=budget_left)


def _hold_if_covered(worst: _WorstCase) -> Hold | None:
    """On PostgreSQL, hold the worst case if the spendable balance covers it, in one
    statement (`_HOLD_IF_COVERED`); None when it does not.

    One statement, because the customer's row is the one every call of the organization
    locks: locked by a statement, it is free again as soon as the statement ends, instead
    of waiting for the process to send the next one and commit.
    """
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_HOLD_IF_COVERED, worst.params(now))
        row = cursor.fetchone()
    return worst.placed(row[0], now) if row is not None else None


async def _hold_one_if_covered(params: dict) -> int | None:
    """Hold one call's worst case if the balance covers it: the new hold's id, or None."""
    row = await fetch_one(_HOLD_IF_COVERED, params)
    return row[0] if row is not None else None


async def _holds_if_covered(rows: list[dict]) -> list[int | None]:
    """`_hold_one_if_covered` for many calls, in one statement (`_HOLDS_IF_COVERED`)."""
    placed = await fetch_all(_HOLDS_IF_COVERED, as_columns(rows, scalars=("open",)))
    hold_ids = {request_id: hold_id for hold_id, request_id in placed}
    return [hold_ids.get(row["request"]) for row in rows]


_hold_statements = GroupCommit("hold", one=_hold_one_if_covered, many=_holds_if_covered)

# The conditional reservation of `_open_hold` and the hold's row, in one statement.
_HOLD_IF_COVERED = """
WITH reserved AS (
    UPDATE billing_account SET held_nano = held_nano + %(amount)s
    WHERE id = %(account)s AND balance_nano - held_nano >= %(amount)s
    RETURNING id
)
INSERT INTO billing_hold
    (account_id, api_key_id, request_id, amount_nano, status, created_at, expires_at)
SELECT id, %(key)s, %(request)s, %(amount)s, %(open)s, %(now)s, %(expires)s
FROM reserved
RETURNING id
"""


# The calls of one statement take an account's balance in the order they came: each is
# held if it fits with those before it on the same account. Once one does not fit, the
# later ones are not held either (one less cheap call may have fitted): each of those
# goes the careful way, as a call not covered alone does. The accounts are locked in
# primary-key order (the ledger's rule), in `locked`, before any is changed.
_HOLDS_IF_COVERED = """
WITH wanted AS MATERIALIZED (
    SELECT * FROM unnest(
        %(account)s::bigint[], %(key)s::bigint[], %(request)s::text[], %(amount)s::bigint[],
        %(now)s::timestamptz[], %(expires)s::timestamptz[]
    ) WITH ORDINALITY AS w(account_id, api_key_id, request_id, amount_nano, created_at,
                           expires_at, arrival)
), locked AS MATERIALIZED (
    SELECT id, balance_nano - held_nano AS free FROM billing_account
    WHERE id IN (SELECT account_id FROM wanted)
    ORDER BY id FOR NO KEY UPDATE
), covered AS MATERIALIZED (
    SELECT w.* FROM (
        SELECT *, sum(amount_nano) OVER (PARTITION BY account_id ORDER BY arrival) AS running
        FROM wanted
    ) AS w JOIN locked AS l ON l.id = w.account_id
    WHERE w.running <= l.free
), reserved AS (
    UPDATE billing_account AS a SET held_nano = a.held_nano + c.amount
    FROM (SELECT account_id, sum(amount_nano) AS amount FROM covered GROUP BY account_id) AS c
    WHERE a.id = c.account_id
)
INSERT INTO billing_hold
    (account_id, api_key_id, request_id, amount_nano, status, created_at, expires_at)
SELECT account_id, api_key_id, request_id, amount_nano, %(open)s, created_at, expires_at
FROM covered
RETURNING id, request_id
"""


def _hold_what_is_affordable(
    *, worst: _WorstCase, quote: CallQuote, budget_left: Nano | None
) -> tuple[Hold, int]:
    """The careful path of `hold_place_for_call`, inside its transaction: read what the
    balance (and the budget) affords, cap the call there or refuse it."""
    available = Account.objects.get(pk=worst.account_id).available_nano
    limited_by = "balance"
    if budget_left is not None and budget_left < available:
        available, limited_by = max(budget_left, 0), "budget"
    affordable = (
        affordable_completion_tokens(
            available_nano=available, prompt_tokens=quote.prompt_tokens, rates=quote.rates
        )
        // quote.n
    )
    wanted = quote.max_tokens
    if wanted is None:
        wanted = min(quote.output_cap, affordable)
        if wanted < quote.min_reply_tokens:
            wanted = quote.min_reply_tokens  # quoted below, and refused
    cost = quote.cost_with(wanted)
    if cost > available:
        raise CallNotAffordable(
            available_nano=available,
            needed_nano=cost,
            limited_by=limited_by,
            affordable_tokens=min(affordable, quote.output_cap),
        )
    hold = _open_hold(
        account_id=worst.account_id,
        key_id=worst.key_id,
        request_id=worst.request_id,
        amount_nano=cost,
        expires_at=worst.expires_at,
        available_nano=available,
    )
    return hold, wanted


def _hold_close(*, hold: Hold, status: HoldStatus) -> bool:
    """Claim an open hold for closing; False if someone else already closed it."""
    claimed = Hold.objects.filter(pk=hold.pk, status=HoldStatus.OPEN).update(
        status=status, closed_at=timezone.now()
    )
    if not claimed:
        return False
    Account.objects.filter(pk=hold.account_id).update(held_nano=F("held_nano") - hold.amount_nano)
    hold.status = status
    return True


def _released_hold_settle(hold: Hold) -> bool:
    """Claim a released hold for a settlement that came late; False if it is not released
    (settled before). Its amount left the account's held sum when it was released."""
    claimed = Hold.objects.filter(pk=hold.pk, status=HoldStatus.RELEASED).update(
        status=HoldStatus.SETTLED, closed_at=timezone.now()
    )
    if claimed:
        logger.warning("call %s: settled after its hold had been released", hold.request_id)
        hold.status = HoldStatus.SETTLED
    return bool(claimed)


def hold_release(*, hold: Hold) -> bool:
    """Free a hold without charging anything. Idempotent: False if it was already closed."""
    with transaction.atomic():
        return _hold_close(hold=hold, status=HoldStatus.RELEASED)


def hold_settle(
    *, hold: Hold, cost_nano: Nano, memo: str = ""
) -> tuple[bool, Transfer | None, Nano]:
    """Close a hold and charge the metered cost, in the caller's transaction.

    Returns (settled, transfer, charged_nano). `settled` is False if the hold was already
    settled: a retried settlement changes nothing. A hold released meanwhile (given up for
    dead by `holds_release_stale`: its call's settlement waited out a database outage
    longer than the hold's life) is settled all the same, its amount having gone back to
    the balance then: the call was metered, and the upstream bills it. The charge never
    takes the customer below zero: if the metered cost exceeds what the balance has (an
    upstream that counted more prompt tokens than our estimate, or a released hold's
    money spent since), the part that cannot be collected is not charged, and the caller
    records it.
    """
    with transaction.atomic(savepoint=False):
        if not (_hold_close(hold=hold, status=HoldStatus.SETTLED) or _released_hold_settle(hold)):
            return False, None, 0
        if cost_nano <= 0:
            return True, None, 0
        customer = Account.objects.select_for_update().get(pk=hold.account_id)
        charged = min(cost_nano, customer.available_nano)
        if charged <= 0:
            return True, None, 0
        transfer = transfer_post(
            from_account=customer,
            to_account=revenue_account(customer.organization_id),
            amount_nano=charged,
            kind=TransferKind.CHARGE,
            memo=memo,
            api_key_id=hold.api_key_id,
        )
        return True, transfer, charged


def holds_release_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """Release open holds past their expiry: their request died (process killed, server
    restarted) without settling. Charges nothing: what was not metered is not billed. The
    released hold row (status, closed_at) is the history of what happened. Safe to run
    twice at once: each hold is claimed by a conditional update."""
    now = now or timezone.now()
    stale = Hold.objects.filter(status=HoldStatus.OPEN, expires_at__lt=now).order_by("pk")
    released = 0
    for hold in stale[:limit]:
        if hold_release(hold=hold):
            logger.warning(
                "released the stale hold of call %s (%s nano-USD)",
                hold.request_id,
                hold.amount_nano,
            )
            released += 1
    return released


def low_balance_alerts_send() -> int:
    """Email an organization's owners once when its available balance falls below its
    threshold; re-arm once a top-up lifts it above. The alert flag is claimed by a
    conditional update, so concurrent runs send one email, not two."""
    below = Q(balance_nano__lt=F("held_nano") + F("low_balance_threshold_nano"))
    armed = Account.objects.filter(
        kind=AccountKind.CUSTOMER, low_balance_threshold_nano__isnull=False
    )
    sent = 0
    for account in armed.filter(below, is_low_balance_alerted=False).select_related("organization"):
        claimed = Account.objects.filter(pk=account.pk, is_low_balance_alerted=False).update(
            is_low_balance_alerted=True
        )
        if claimed:
            _send_low_balance_email(account)
            sent += 1
    armed.filter(~below, is_low_balance_alerted=True).update(is_low_balance_alerted=False)
    return sent


class ThresholdError(ValueError):
    """A low-balance threshold that cannot be set; the message says why, for the customer."""


def low_balance_threshold_set(
    *, organization: Organization, threshold_nano: Nano | None
) -> Account:
    """Set the available balance below which the organization's owners are emailed (None:
    never).

    A changed threshold re-arms the alert: the next run of `low_balance_alerts_send` judges
    the balance against the new threshold afresh, so raising it above the balance warns
    once more, and an alert sent under the old threshold does not silence the new one.
    Setting the same threshold again changes nothing (no second email). Moves no money; a
    concurrent change simply wins or loses as a whole.
    """
    if threshold_nano is not None and threshold_nano <= 0:
        raise ThresholdError(_("the threshold must be more than zero; leave it empty for none"))
    if threshold_nano is not None and threshold_nano % NANO_PER_CENT:
        raise ThresholdError(_("the threshold is a whole number of cents"))
    if threshold_nano is not None and threshold_nano > LOW_BALANCE_THRESHOLD_MAX_NANO:
        raise ThresholdError(
            _("the threshold can be at most $%(max)s")
            % {"max": format_usd(LOW_BALANCE_THRESHOLD_MAX_NANO, 2)}
        )
    account = account_for_organization(organization=organization)
    if account.low_balance_threshold_nano != threshold_nano:
        Account.objects.filter(pk=account.pk).update(
            low_balance_threshold_nano=threshold_nano, is_low_balance_alerted=False
        )
        account.low_balance_threshold_nano = threshold_nano
        account.is_low_balance_alerted = False
    return account


def _send_low_balance_email(account: Account) -> None:
    owners = list(
        Membership.objects.filter(
            organization_id=account.organization_id, role=Role.OWNER
        ).values_list("user__email", flat=True)
    )
    if not owners:
        return
    org = account.organization
    threshold = format_usd(account.low_balance_threshold_nano, 2)
    send_mail(
        subject=f"[real200] {org.name}: balance below ${threshold}",
        message=(
            f"The available balance of {org.name} is ${format_usd(account.available_nano, 2)}, "
            f"below your alert threshold of ${threshold}.\n"
            "API calls are refused with 402 once the balance cannot cover them. "
            "Top up in the dashboard to keep your apps running.\n"
        ),
        from_email=None,
        recipient_list=owners,
        fail_silently=False,
    )
