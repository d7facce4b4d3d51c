from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.billing.money import format_usd
from apps.billing.topups import CODE_MINT_MAX, TopupError, code_mint
from config.cli import positive_usd


class Command(BaseCommand):
    help = (
        "Mint redemption codes worth --amount USD each; prints every code once (they are "
        "stored only as hashes), then a summary."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--amount", required=True, type=positive_usd, help="USD per code, e.g. 10.00"
        )
        parser.add_argument("--count", required=True, type=int, help=f"1 to {CODE_MINT_MAX}")
        parser.add_argument("--batch", default="", help="a name to find the batch by later")
        parser.add_argument("--expires-in", type=int, default=None, metavar="DAYS")

    def handle(
        self, *args, amount: int, count: int, batch: str, expires_in: int | None, **options
    ) -> None:
        if expires_in is not None and expires_in < 1:
            raise CommandError("--expires-in: at least 1 day")
        expires_at = timezone.now() + timedelta(days=expires_in) if expires_in else None
        try:
            codes = code_mint(
                amount_nano=amount,
                count=count,
                batch=batch,
                created_by=None,
                expires_at=expires_at,
            )
        except TopupError as exc:
            raise CommandError(str(exc)) from None
        for code in codes:
            self.stdout.write(code)
        summary = f"minted {len(codes)} codes of {format_usd(amount)} USD"
        if batch.strip():
            summary += f" in batch {batch.strip()}"
        if expires_at is not None:
            summary += f", expiring {expires_at:%Y-%m-%d %H:%M} UTC"
        self.stdout.write(summary)
