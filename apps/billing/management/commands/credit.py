from __future__ import annotations

from django.core.management.base import BaseCommand

from apps.billing.money import format_usd
from apps.billing.selectors import available_nano_for_organization
from apps.billing.services import credit_grant
from apps.tenancy.models import Organization
from config.cli import organization, positive_usd


class Command(BaseCommand):
    help = "Credit an organization's balance (a ledger transfer); prints the new balance."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--org", required=True, type=organization, help="the organization's slug"
        )
        parser.add_argument("--amount", required=True, type=positive_usd, help="USD, e.g. 25.00")
        parser.add_argument("--note", default="operator credit")

    def handle(self, *args, org: Organization, amount: int, note: str, **options) -> None:
        transfer = credit_grant(organization=org, amount_nano=amount, memo=note)
        balance = available_nano_for_organization(organization=org)
        self.stdout.write(f"credited {format_usd(amount)} USD (transfer {transfer.pk})")
        self.stdout.write(f"balance {format_usd(balance)} USD")
