from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apps.keys.models import BudgetPeriod
from apps.keys.services import KeyPolicyError, key_create
from config.cli import organization, usd


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class Command(BaseCommand):
    help = "Create an API key for an organization; prints the full key once, last."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--org", required=True, type=organization, help="the organization's slug"
        )
        parser.add_argument("--name", default="")
        parser.add_argument("--rpm", type=int, help="requests per minute")
        parser.add_argument("--tpm", type=int, help="tokens per minute")
        parser.add_argument("--models", help="allowed models, comma-separated (default: all)")
        parser.add_argument("--budget", type=usd, help="spending limit in USD, e.g. 25.00")
        parser.add_argument(
            "--budget-period", choices=BudgetPeriod.values, default=BudgetPeriod.LIFETIME
        )
        parser.add_argument("--expires-in", type=int, metavar="DAYS")
        parser.add_argument("--ips", help="allowed IP ranges, comma-separated CIDR")

    def handle(self, *args, **options) -> None:
        org = options["org"]
        expires_at = None
        if options["expires_in"] is not None:
            if options["expires_in"] < 1:
                raise CommandError("--expires-in must be at least 1 day")
            expires_at = timezone.now() + timedelta(days=options["expires_in"])
        try:
            key, clear = key_create(
                organization=org,
                name=options["name"],
                allowed_models=_csv(options["models"]),
                rpm=options["rpm"],
                tpm=options["tpm"],
                budget_nano=options["budget"],
                budget_period=options["budget_period"],
                expires_at=expires_at,
                allowed_ips=_csv(options["ips"]),
            )
        except KeyPolicyError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"created key {key.pk} ({key.display}) for {org.slug}; shown once:")
        self.stdout.write(clear)
