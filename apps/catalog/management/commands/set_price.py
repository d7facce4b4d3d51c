from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.billing.money import format_usd
from apps.catalog.services import CatalogError, price_set
from config.cli import usd


class Command(BaseCommand):
    help = "Set a model's price in USD per million tokens (a new price version)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model")
        parser.add_argument("--input", required=True, type=usd, help="USD per 1M input tokens")
        parser.add_argument("--output", required=True, type=usd, help="USD per 1M output tokens")
        parser.add_argument(
            "--cached-input", type=usd, help="USD per 1M cached input tokens (default: --input)"
        )
        parser.add_argument(
            "--cache-write",
            type=usd,
            help="USD per 1M input tokens written to the prompt cache (default: --input)",
        )

    def handle(
        self,
        *args,
        model: str,
        input: int,
        output: int,
        cached_input: int | None,
        cache_write: int | None,
        **options,
    ) -> None:
        try:
            price = price_set(
                model_name=model,
                input_nano_per_mtok=input,
                output_nano_per_mtok=output,
                cached_input_nano_per_mtok=cached_input,
                cache_write_nano_per_mtok=cache_write,
            )
        except CatalogError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"price #{price.pk} for {model}: input {format_usd(price.input_nano_per_mtok)}, "
            f"cached input {format_usd(price.cached_input_nano_per_mtok)}, "
            f"cache write {format_usd(price.cache_write_nano_per_mtok)}, "
            f"output {format_usd(price.output_nano_per_mtok)} USD per 1M tokens"
        )
