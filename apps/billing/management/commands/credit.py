from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.billing.selectors import available_nano_for_organization
from apps.billing.services import credit_grant
from apps.tenancy.selectors import organization_get_by_slug


class Command(BaseCommand):
    help = "Credit an organization's balance (a ledger transfer); prints the new balance."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--org", required=True, help="the organization's slug")
        parser.add_argument("--amount", required=True, help="USD, e.g. 25.00")
        parser.add_argument("--note", default="operator credit")

    def handle(self, *args, org: str, amount: str, note: str, **options) -> None:
        organization = organization_get_by_slug(slug=org)
        if organization is None:
            raise CommandError(f"no organization with slug {org!r}")
        try:
            amount_nano = parse_usd(amount, allow_zero=False)
        except MoneyError as exc:
            raise CommandError(f"--amount: {exc}") from None
        transfer = credit_grant(organization=organization, amount_nano=amount_nano, memo=note)
        balance = available_nano_for_organization(organization=organization)
        self.stdout.write(f"credited {format_usd(amount_nano)} USD (transfer {transfer.pk})")
        self.stdout.write(f"balance {format_usd(balance)} USD")
