"""Writes on models, prices and channels."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from apps.catalog.models import Channel, ChannelKind, ChannelModel, LanguageModel, Price


class CatalogError(ValueError):
    """A catalog change that cannot be made as asked (the message says why)."""


def model_get_or_create(*, name: str) -> LanguageModel:
    name = name.strip()
    if not name:
        raise CatalogError("a model needs a name")
    model, _ = LanguageModel.objects.get_or_create(name=name)
    return model


def price_set(
    *,
    model_name: str,
    input_nano_per_mtok: int,
    output_nano_per_mtok: int,
    cached_input_nano_per_mtok: int | None = None,
    cache_write_nano_per_mtok: int | None = None,
) -> Price:
    """A new price version for a model (created if new). Past charges keep theirs.

    Without a cached-input price, cached tokens cost what other input tokens cost: never
    more, and no discount the operator did not choose. Likewise, without a cache-write
    price, tokens written to a prompt cache cost what other input tokens cost.
    """
    if cached_input_nano_per_mtok is None:
        cached_input_nano_per_mtok = input_nano_per_mtok
    if cache_write_nano_per_mtok is None:
        cache_write_nano_per_mtok = input_nano_per_mtok
    rates = (
        input_nano_per_mtok,
        output_nano_per_mtok,
        cached_input_nano_per_mtok,
        cache_write_nano_per_mtok,
    )
    if min(rates) < 0:
        raise CatalogError("prices must not be negative")
    with transaction.atomic():
        return Price.objects.create(
            model=model_get_or_create(name=model_name),
            input_nano_per_mtok=input_nano_per_mtok,
            output_nano_per_mtok=output_nano_per_mtok,
            cached_input_nano_per_mtok=cached_input_nano_per_mtok,
            cache_write_nano_per_mtok=cache_write_nano_per_mtok,
        )


def parse_model_mapping(spec: str) -> dict[str, str]:
    """`"gpt-4o,fast=gpt-4o-mini"` → {"gpt-4o": "gpt-4o", "fast": "gpt-4o-mini"}."""
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        name, _, upstream = item.strip().partition("=")
        name, upstream = name.strip(), (upstream.strip() or name.strip())
        if not name:
            continue
        if name in mapping:
            raise CatalogError(f"model {name!r} is listed twice")
        mapping[name] = upstream
    if not mapping:
        raise CatalogError("a channel serves at least one model")
    return mapping


@transaction.atomic
def channel_add(
    *,
    name: str,
    kind: str,
    models: dict[str, str],
    base_url: str = "",
    api_key: str = "",
    priority: int = 0,
    weight: int = 1,
    timeout_seconds: float = 60.0,
    settings: dict | None = None,
) -> Channel:
    """A new upstream channel serving `models` ({our name: the upstream's name})."""
    if kind not in ChannelKind.values:
        raise CatalogError(f"channel type must be one of {', '.join(ChannelKind.values)}")
    if kind != ChannelKind.DEMO and not base_url:
        raise CatalogError(f"a {kind} channel needs --base-url")
    if base_url:
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError:
            raise CatalogError(f"{base_url!r} is not an http(s) URL") from None
    if weight < 1:
        raise CatalogError("weight must be at least 1")
    if timeout_seconds <= 0:
        raise CatalogError("timeout must be more than zero seconds")
    if Channel.objects.filter(name=name).exists():
        raise CatalogError(f"a channel named {name!r} already exists")
    channel = Channel.objects.create(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        api_key=api_key,
        priority=priority,
        weight=weight,
        timeout_seconds=timeout_seconds,
        settings=settings or {},
    )
    for model_name, upstream_name in models.items():
        ChannelModel.objects.create(
            channel=channel, model=model_get_or_create(name=model_name), upstream_name=upstream_name
        )
    return channel
