from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from apps.billing.money import format_usd
from apps.usage.services import books_reconcile


class Command(BaseCommand):
    help = (
        "Recompute every balance from the ledger, check the zero sum, compare usage with "
        "the ledger; store the report; exit 1 on any difference."
    )

    def handle(self, *args, **options) -> None:
        report = books_reconcile()
        self.stdout.write(f"accounts: {report.accounts}")
        self.stdout.write(f"transfers: {report.transfers}")
        self.stdout.write(f"usage records: {report.usage_records}")
        self.stdout.write(f"sum over all accounts: {format_usd(report.total_nano)} USD")
        for problem in report.problems:
            self.stdout.write(f"PROBLEM: {problem}")
        if report.is_clean:
            self.stdout.write(f"books are clean (report #{report.pk})")
            return
        self.stdout.write(f"{len(report.problems)} problem(s) found (report #{report.pk})")
        sys.exit(1)
