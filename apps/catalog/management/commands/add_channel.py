from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.catalog.models import ChannelKind
from apps.catalog.services import CatalogError, channel_add, parse_model_mapping


class Command(BaseCommand):
    help = "Add an upstream channel and the models it serves (name or name=upstream-name)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name")
        parser.add_argument("--type", required=True, choices=ChannelKind.values, dest="kind")
        parser.add_argument("--base-url", default="", help="e.g. https://api.openai.com/v1")
        parser.add_argument("--api-key", default="", help="the provider's secret key")
        parser.add_argument("--models", required=True, help="m1,m2=upstream-name")
        parser.add_argument("--priority", type=int, default=0, help="higher is tried first")
        parser.add_argument("--weight", type=int, default=1, help="share among equal priority")
        parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    def handle(self, *args, name: str, **options) -> None:
        try:
            channel = channel_add(
                name=name,
                kind=options["kind"],
                models=parse_model_mapping(options["models"]),
                base_url=options["base_url"],
                api_key=options["api_key"],
                priority=options["priority"],
                weight=options["weight"],
                timeout_seconds=options["timeout"],
            )
        except CatalogError as exc:
            raise CommandError(str(exc)) from None
        served = ", ".join(
            f"{link.model.name}={link.upstream_name}"
            for link in channel.model_links.select_related("model").order_by("model__name")
        )
        self.stdout.write(f"added channel {channel.name} ({channel.kind}) serving {served}")
