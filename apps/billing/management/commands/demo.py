from __future__ import annotations

import secrets

from django.core.management.base import BaseCommand
from django.db import transaction

from apps.billing.models import AccountKind, TransferKind
from apps.billing.money import format_usd, parse_usd
from apps.billing.selectors import available_nano_for_organization
from apps.billing.services import account_for_organization, system_account, transfer_post_once
from apps.catalog.models import Channel, ChannelKind, Price
from apps.catalog.services import channel_add, price_set
from apps.keys.services import key_create
from apps.tenancy.selectors import organization_get_by_slug
from apps.tenancy.services import organization_create, user_get_or_create

DEMO_ORG = "demo"
DEMO_OWNER = "demo@real200.local"
DEMO_CREDIT_USD = "10.00"
# The built-in demo channel answers under familiar names, so the quick-start examples run
# unchanged. Prices are USD per million tokens: input, cached input, cache write, output
# (OpenAI charges nothing extra for writing its cache; Anthropic 1.25 times its input).
DEMO_MODELS = {
    "gpt-4o": ("2.50", "1.25", "2.50", "10.00"),
    "gpt-4o-mini": ("0.15", "0.075", "0.15", "0.60"),
    "claude-sonnet-4": ("3.00", "0.30", "3.75", "15.00"),
}


class Command(BaseCommand):
    help = "Set up (idempotently) a demo organization with credit, the demo channel and a key."

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        owner, _ = user_get_or_create(email=DEMO_OWNER)
        org = organization_get_by_slug(slug=DEMO_ORG) or organization_create(
            slug=DEMO_ORG, name="Demo", owner=owner
        )
        transfer_post_once(
            idempotency_key="demo:initial-credit",
            from_account=system_account(AccountKind.PROMOTIONS),
            to_account=account_for_organization(organization=org),
            amount_nano=parse_usd(DEMO_CREDIT_USD),
            kind=TransferKind.GRANT,
            memo="demo credit",
        )
        for model, (input_usd, cached_usd, cache_write_usd, output_usd) in DEMO_MODELS.items():
            if not Price.objects.filter(model__name=model).exists():
                price_set(
                    model_name=model,
                    input_nano_per_mtok=parse_usd(input_usd),
                    cached_input_nano_per_mtok=parse_usd(cached_usd),
                    cache_write_nano_per_mtok=parse_usd(cache_write_usd),
                    output_nano_per_mtok=parse_usd(output_usd),
                )
        if not Channel.objects.filter(name="demo").exists():
            channel_add(
                name="demo",
                kind=ChannelKind.DEMO,
                models={model: model for model in DEMO_MODELS},
                settings={"pace_ms": 20},
            )
        # A fresh password on every run: the demo account is for the person at this
        # machine, who reads it here, and an old one is never left lying around.
        password = secrets.token_urlsafe(12)
        owner.set_password(password)
        owner.save(update_fields=["password"])
        _, clear = key_create(organization=org, name="demo key")
        balance = available_nano_for_organization(organization=org)
        self.stdout.write(f"demo organization {org.slug}: balance {format_usd(balance, 2)} USD")
        self.stdout.write(f"dashboard login: {DEMO_OWNER} / {password}")
        self.stdout.write(f"models: {', '.join(DEMO_MODELS)}")
        self.stdout.write(clear)
