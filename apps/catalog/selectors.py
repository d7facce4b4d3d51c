"""Reads on the catalog: what a model costs and which channels serve it, in what order."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from apps.catalog.models import ChannelModel, LanguageModel, Price
from config.asyncdb import SingleFlight, db_step


@dataclass(frozen=True, slots=True)
class PriceVersion:
    id: int
    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    cache_write_nano_per_mtok: int


@dataclass(frozen=True, slots=True)
class ChannelRoute:
    id: int
    name: str
    kind: str
    base_url: str
    api_key: str
    upstream_model: str
    priority: int
    weight: int
    timeout_seconds: float
    settings: dict

    def __repr__(self) -> str:  # never print the provider's secret
        return f"ChannelRoute({self.name!r}, {self.kind}, {self.upstream_model!r})"


@dataclass(frozen=True, slots=True)
class Route:
    """A callable model: its price in force and its enabled channels."""

    model: str
    owned_by: str
    created_at: int
    max_output_tokens: int
    price: PriceVersion
    channels: tuple[ChannelRoute, ...]

    def channels_in_order(self, rng: random.Random | None = None) -> list[ChannelRoute]:
        """Highest priority first; among equal priorities a random order weighted by
        `weight` (each channel's chance of going first is its share of the weights)."""
        rng = rng or random
        keyed = [
            (-channel.priority, -(rng.random() ** (1.0 / channel.weight)), i)
            for i, channel in enumerate(self.channels)
        ]
        return [self.channels[i] for *_, i in sorted(keyed)]


def _load_route(name: str) -> Route | None:
    model = LanguageModel.objects.filter(name=name, is_enabled=True).first()
    if model is None:
        return None
    price = Price.objects.filter(model=model).order_by("-pk").first()
    links = ChannelModel.objects.filter(model=model, channel__is_enabled=True).select_related(
        "channel"
    )
    channels = tuple(
        ChannelRoute(
            id=link.channel.pk,
            name=link.channel.name,
            kind=link.channel.kind,
            base_url=link.channel.base_url,
            api_key=link.channel.api_key,
            upstream_model=link.upstream_name,
            priority=link.channel.priority,
            weight=link.channel.weight,
            timeout_seconds=link.channel.timeout_seconds,
            settings=link.channel.settings,
        )
        for link in links.order_by("channel_id")
    )
    if price is None or not channels:
        return None  # not callable: nothing to charge, or nobody to serve it
    return Route(
        model=model.name,
        owned_by=model.owned_by,
        created_at=int(model.created_at.timestamp()),
        max_output_tokens=model.max_output_tokens,
        price=PriceVersion(
            id=price.pk,
            input_nano_per_mtok=price.input_nano_per_mtok,
            output_nano_per_mtok=price.output_nano_per_mtok,
            cached_input_nano_per_mtok=price.cached_input_nano_per_mtok,
            cache_write_nano_per_mtok=price.cache_write_nano_per_mtok,
        ),
        channels=channels,
    )


# Routes are read on every call and change rarely: each process keeps them a few seconds,
# so a new price or a disabled channel takes effect everywhere within ROUTE_TTL.
ROUTE_TTL = 5.0
_routes: dict[str, tuple[float, Route | None]] = {}
_route_loads = SingleFlight()


async def route_for_model(name: str) -> Route | None:
    if "\x00" in name:
        return None  # no model is named so: PostgreSQL's text cannot even hold the name
    memo = _routes.get(name)
    if memo is not None and memo[0] > time.monotonic():
        return memo[1]
    return await _route_loads.run(name, lambda: _route_remembered(name))


async def _route_remembered(name: str) -> Route | None:
    route = await db_step(_load_route, name)
    if len(_routes) > 10_000:
        _routes.clear()
    _routes[name] = (time.monotonic() + ROUTE_TTL, route)
    return route


def routes_forget() -> None:
    """Drop this process's routes (tests, and right after an operator's change)."""
    _routes.clear()
    _route_loads.forget()


@dataclass(frozen=True, slots=True)
class CallableModel:
    name: str
    owned_by: str
    created: int


def callable_models() -> list[CallableModel]:
    """Models that have a price and at least one enabled channel, by name."""
    models = (
        LanguageModel.objects.filter(
            is_enabled=True, prices__isnull=False, channel_links__channel__is_enabled=True
        )
        .distinct()
        .order_by("name")
    )
    return [
        CallableModel(name=m.name, owned_by=m.owned_by, created=int(m.created_at.timestamp()))
        for m in models
    ]


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A callable model and its price in force, nano-dollars per million tokens."""

    name: str
    owned_by: str
    input_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    cache_write_nano_per_mtok: int
    output_nano_per_mtok: int


def price_list_callable() -> list[ModelPrice]:
    """Every callable model (as `callable_models`) with its newest price, by name: two
    queries whatever the number of models."""
    models = callable_models()
    newest: dict[str, Price] = {}
    prices = (
        Price.objects.filter(model__name__in=[m.name for m in models])
        .select_related("model")
        .order_by("model_id", "-pk")
    )
    for price in prices:
        newest.setdefault(price.model.name, price)
    return [
        ModelPrice(
            name=m.name,
            owned_by=m.owned_by,
            input_nano_per_mtok=newest[m.name].input_nano_per_mtok,
            cached_input_nano_per_mtok=newest[m.name].cached_input_nano_per_mtok,
            cache_write_nano_per_mtok=newest[m.name].cache_write_nano_per_mtok,
            output_nano_per_mtok=newest[m.name].output_nano_per_mtok,
        )
        for m in models
    ]
