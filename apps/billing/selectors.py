"""Reads on the books."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from django.db.models import (
    BigIntegerField,
    Case,
    F,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce

from apps.billing.models import (
    Account,
    AccountKind,
    Hold,
    HoldStatus,
    StripeCheckout,
    Transfer,
)
from apps.billing.money import Nano, format_usd
from apps.tenancy.models import Organization


def balance_for_organization(*, organization: Organization) -> Account | None:
    return Account.objects.filter(organization=organization).first()


def available_nano_for_organization(*, organization: Organization) -> Nano:
    account = balance_for_organization(organization=organization)
    return account.available_nano if account else 0


@dataclass(frozen=True, slots=True)
class BalanceSummary:
    """An organization's money at a glance: zeros for one that has never had any."""

    balance_nano: Nano = 0
    held_nano: Nano = 0
    threshold_nano: Nano | None = None  # the low-balance warning; None: off

    @property
    def available_nano(self) -> Nano:
        return self.balance_nano - self.held_nano

    @property
    def is_below_threshold(self) -> bool:
        """What `low_balance_alerts_send` emails the owners about."""
        return self.threshold_nano is not None and self.available_nano < self.threshold_nano


def balance_summary_for_organization(*, organization: Organization) -> BalanceSummary:
    account = balance_for_organization(organization=organization)
    if account is None:
        return BalanceSummary()
    return BalanceSummary(
        balance_nano=account.balance_nano,
        held_nano=account.held_nano,
        threshold_nano=account.low_balance_threshold_nano,
    )


def holds_open_for_organization(*, organization: Organization) -> QuerySet[Hold]:
    """The organization's open holds (calls in flight), newest first, with their keys."""
    return (
        Hold.objects.filter(account__organization=organization, status=HoldStatus.OPEN)
        .select_related("api_key")
        .order_by("-created_at", "-pk")
    )


def ledger_for_organization(*, organization: Organization) -> QuerySet[Transfer]:
    """The transfers into and out of the organization's account, newest first, each with
    `signed_nano`: the amount, negative when the money went out.

    Every transfer moves money between two accounts, and a customer account belongs to one
    organization: filtering on this account's id is the whole tenant boundary. The id is
    looked up first so the database gets two plain index conditions, not a join.
    """
    account = balance_for_organization(organization=organization)
    if account is None:
        return Transfer.objects.none()
    return (
        Transfer.objects.filter(Q(from_account_id=account.pk) | Q(to_account_id=account.pk))
        .annotate(
            signed_nano=Case(
                When(to_account_id=account.pk, then=F("amount_nano")),
                default=-F("amount_nano"),
                output_field=BigIntegerField(),
            )
        )
        # What each transfer was for, in the same query: the call it charged, the code
        # it redeemed, the card payment it credited.
        .select_related("api_key", "created_by", "usage_record", "redemption", "checkout")
        .order_by("-pk")
    )


def ledger_balances_after(
    *, organization: Organization, transfers: Sequence[Transfer]
) -> list[Nano]:
    """The account's balance just after each of `transfers`: consecutive rows of
    `ledger_for_organization` (a page of it), newest first.

    Counted back from the current balance, so a page costs one query however long the
    history: the balance after the page's newest row is the balance now less what every
    later transfer moved. The balance and those sums are read in one statement, which sees
    a transfer and its balance update together or not at all (they commit together).
    """
    if not transfers:
        return []

    def moved_later(direction: str) -> Coalesce:
        later = (
            Transfer.objects.filter(**{direction: OuterRef("pk")}, pk__gt=transfers[0].pk)
            .order_by()
            .values(direction)
            .annotate(total=Sum("amount_nano"))
            .values("total")
        )
        return Coalesce(Subquery(later), Value(0), output_field=BigIntegerField())

    balance, later_in, later_out = (
        Account.objects.filter(organization=organization)
        .annotate(later_in=moved_later("to_account"), later_out=moved_later("from_account"))
        .values_list("balance_nano", "later_in", "later_out")
        .get()
    )
    after = balance - later_in + later_out
    balances = []
    for transfer in transfers:
        balances.append(after)
        after -= transfer.signed_nano
    return balances


def checkout_for_organization(
    *, organization: Organization, session_id: str
) -> StripeCheckout | None:
    """The organization's Stripe checkout with this session id; None for another
    organization's as for one that does not exist."""
    return StripeCheckout.objects.filter(organization=organization, session_id=session_id).first()


@dataclass
class BooksReport:
    """What reconciliation found. `problems` is empty when the books agree to the unit."""

    accounts: int = 0
    transfers: int = 0
    total_nano: Nano = 0  # sum over every account's recomputed balance: must be zero
    problems: list[str] = field(default_factory=list)

    @property
    def is_clean(self) -> bool:
        return not self.problems


def books_check() -> BooksReport:
    """Recompute every balance from the ledger and compare; never corrects anything."""
    report = BooksReport()
    incoming = dict(
        Transfer.objects.values_list("to_account").annotate(total=Sum("amount_nano")).order_by()
    )
    outgoing = dict(
        Transfer.objects.values_list("from_account").annotate(total=Sum("amount_nano")).order_by()
    )
    open_holds = dict(
        Hold.objects.filter(status=HoldStatus.OPEN)
        .values_list("account")
        .annotate(total=Sum("amount_nano"))
        .order_by()
    )
    report.transfers = Transfer.objects.count()
    for account in Account.objects.select_related("organization").order_by("pk"):
        report.accounts += 1
        computed = incoming.get(account.pk, 0) - outgoing.get(account.pk, 0)
        report.total_nano += computed
        if computed != account.balance_nano:
            report.problems.append(
                f"account {account} balance {format_usd(account.balance_nano)} but its "
                f"transfers sum to {format_usd(computed)}"
            )
        held = open_holds.get(account.pk, 0)
        if held != account.held_nano:
            report.problems.append(
                f"account {account} holds {format_usd(account.held_nano)} but its open "
                f"holds sum to {format_usd(held)}"
            )
        if account.kind == AccountKind.CUSTOMER and computed - held < 0:
            report.problems.append(f"customer account {account} is below zero")
    if report.total_nano != 0:
        report.problems.append(f"the ledger does not sum to zero: {report.total_nano} nano-USD")
    return report
