from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.catalog.services import CatalogError, price_set


class Command(BaseCommand):
    help = "Set a model's price in USD per million tokens (a new price version)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model")
        parser.add_argument("--input", required=True, help="USD per 1M input tokens")
        parser.add_argument("--output", required=True, help="USD per 1M output tokens")
        parser.add_argument(
            "--cached-input", help="USD per 1M cached input tokens (default: --input)"
        )

    def handle(self, *args, model: str, **options) -> None:
        rates = {}
        for option in ("input", "output", "cached_input"):
            if options[option] is None:
                continue
            try:
                rates[option] = parse_usd(options[option])
            except MoneyError as exc:
                raise CommandError(f"--{option.replace('_', '-')}: {exc}") from None
        try:
            price = price_set(
                model_name=model,
                input_nano_per_mtok=rates["input"],
                output_nano_per_mtok=rates["output"],
                cached_input_nano_per_mtok=rates.get("cached_input"),
            )
        except CatalogError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"price #{price.pk} for {model}: input {format_usd(price.input_nano_per_mtok)}, "
            f"cached input {format_usd(price.cached_input_nano_per_mtok)}, "
            f"output {format_usd(price.output_nano_per_mtok)} USD per 1M tokens"
        )
