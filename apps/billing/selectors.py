"""Reads on the books."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Sum

from apps.billing.models import Account, AccountKind, Hold, HoldStatus, Transfer
from apps.billing.money import Nano, format_usd
from apps.tenancy.models import Organization


def balance_for_organization(*, organization: Organization) -> Account | None:
    return Account.objects.filter(organization=organization).first()


def available_nano_for_organization(*, organization: Organization) -> Nano:
    account = balance_for_organization(organization=organization)
    return account.available_nano if account else 0


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
