from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.billing.adjustments import AdjustmentError, AdjustmentKind, Direction, balance_adjust
from apps.billing.money import format_usd
from apps.billing.selectors import available_nano_for_organization
from apps.billing.services import InsufficientFunds
from apps.tenancy.models import Organization, User
from config.cli import organization, positive_usd


class Command(BaseCommand):
    help = (
        "Adjust an organization's balance (a credit, refund or correction, in or out) as a "
        "ledger transfer recording the staff user and the reason; prints the new balance."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--org", required=True, type=organization, help="the organization's slug"
        )
        parser.add_argument("--amount", required=True, type=positive_usd, help="USD, e.g. 25.00")
        parser.add_argument("--kind", required=True, choices=AdjustmentKind.values)
        parser.add_argument("--direction", required=True, choices=Direction.values)
        parser.add_argument("--reason", required=True, help="why: kept on the transfer")
        parser.add_argument("--staff", required=True, metavar="EMAIL", help="who decided it")

    def handle(
        self,
        *args,
        org: Organization,
        amount: int,
        kind: str,
        direction: str,
        reason: str,
        staff: str,
        **options,
    ) -> None:
        staff_user = User.objects.filter(email__iexact=staff.strip()).first()
        if staff_user is None:
            raise CommandError(f"--staff: no user with email {staff!r}")
        try:
            transfer = balance_adjust(
                organization=org,
                amount_nano=amount,
                direction=direction,
                kind=kind,
                reason=reason,
                staff_user=staff_user,
            )
        except AdjustmentError as exc:
            raise CommandError(str(exc)) from None
        except InsufficientFunds as exc:
            raise CommandError(
                f"the balance affords {format_usd(exc.available_nano)} USD: a debit may not "
                "take it below zero"
            ) from None
        balance = available_nano_for_organization(organization=org)
        self.stdout.write(f"{kind} {direction} {format_usd(amount)} USD (transfer {transfer.pk})")
        self.stdout.write(f"balance {format_usd(balance)} USD")
