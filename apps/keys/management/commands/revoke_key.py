from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.keys.selectors import KeyNotFound, key_get_by_reference
from apps.keys.services import key_revoke


class Command(BaseCommand):
    help = "Revoke an API key, named by its full text, its display prefix, or its id."

    def add_arguments(self, parser) -> None:
        parser.add_argument("key")

    def handle(self, *args, key: str, **options) -> None:
        try:
            api_key = key_get_by_reference(reference=key)
        except KeyNotFound as exc:
            raise CommandError(str(exc)) from None
        key_revoke(key=api_key)
        when = f"{api_key.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
        self.stdout.write(f"revoked key {api_key.pk} ({api_key.display}) at {when}")
