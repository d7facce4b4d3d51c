from __future__ import annotations

from django.core.management.base import BaseCommand

from apps.billing.money import format_usd
from apps.billing.selectors import balance_for_organization
from apps.tenancy.models import Organization
from config.cli import organization


class Command(BaseCommand):
    help = "Print an organization's available balance in USD, to the last nano-dollar."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--org", required=True, type=organization, help="the organization's slug"
        )

    def handle(self, *args, org: Organization, **options) -> None:
        account = balance_for_organization(organization=org)
        if account is not None and account.held_nano:
            self.stdout.write(f"held for calls in flight: {format_usd(account.held_nano)} USD")
        self.stdout.write(format_usd(account.available_nano if account else 0))
