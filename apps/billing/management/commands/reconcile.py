from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from apps.billing.selectors import books_check


class Command(BaseCommand):
    help = (
        "Recompute every balance from the ledger and check the zero sum; exit 1 on any difference."
    )

    def handle(self, *args, **options) -> None:
        report = books_check()
        for line in report.lines():
            self.stdout.write(line)
        if not report.is_clean:
            sys.exit(1)
