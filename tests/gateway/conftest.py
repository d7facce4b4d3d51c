"""A live real200 (uvicorn in a thread of the test process) and fake upstreams.

Live tests commit their rows so the server's own connections see them: they use
`transactional_db` and so need PostgreSQL (the embedded SQLite test database is flushed
with DELETE, which the ledger's immutability trigger refuses, by design).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from django.db import connections
from openai import OpenAI

from apps.billing.models import Account, Hold, HoldStatus, Transfer
from apps.billing.money import call_cost_nano, parse_usd
from apps.billing.selectors import books_check
from apps.billing.services import credit_grant
from apps.catalog.models import Channel, LanguageModel, Price
from apps.catalog.selectors import routes_forget
from apps.catalog.services import channel_add, price_set
from apps.keys.models import ApiKey, hash_key
from apps.keys.services import key_create
from apps.tenancy.models import Organization, User
from apps.tenancy.services import organization_create
from apps.usage.models import UsageRecord
from apps.usage.selectors import usage_ledger_problems
from tests.fakes.upstreams import AnthropicFake, FakeUpstream, OpenAIFake
from tests.servers import asgi_in_thread


@pytest.fixture(scope="session")
def real200_url() -> Iterator[str]:
    from config.asgi import application

    with asgi_in_thread(application) as url:
        yield url


# The fake upstreams live as long as the test process (starting and stopping one costs a
# fifth of a second); each test gets them reset: no calls, their first behaviour.


@pytest.fixture(scope="session")
def _openai_servers() -> Iterator[tuple[OpenAIFake, OpenAIFake]]:
    with OpenAIFake() as first, OpenAIFake() as second:
        yield first, second


@pytest.fixture(scope="session")
def _anthropic_server() -> Iterator[AnthropicFake]:
    with AnthropicFake() as fake:
        yield fake


def _fresh(fake: FakeUpstream) -> FakeUpstream:
    fake.reset()
    return fake


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP client the provider adapters are handed, as the gateway's own."""
    async with aiohttp.ClientSession(trust_env=False) as client:
        yield client


@pytest.fixture
def openai_fake(_openai_servers) -> OpenAIFake:
    return _fresh(_openai_servers[0])


@pytest.fixture
def anthropic_fake(_anthropic_server) -> AnthropicFake:
    return _fresh(_anthropic_server)


@dataclass
class Live:
    """A funded organization with a key, calling the live server."""

    url: str
    key: str
    org_id: int
    upstream: OpenAIFake

    @property
    def sdk(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=30)

    def post(self, body: object, *, key: str | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, **kwargs)

    def balance_nano(self) -> int:
        return Account.objects.get(organization_id=self.org_id).balance_nano

    def held_nano(self) -> int:
        return Account.objects.get(organization_id=self.org_id).held_nano

    def ledger_size(self) -> int:
        return Transfer.objects.count()

    def account(self, org_id: int | None = None) -> Account:
        return Account.objects.get(organization_id=org_id or self.org_id)

    def records(self, org_id: int | None = None) -> list[UsageRecord]:
        records = UsageRecord.objects.filter(organization_id=org_id or self.org_id)
        return list(records.order_by("pk"))

    def wait_settled(
        self, count: int = 1, seconds: float = 5.0, *, org_id: int | None = None
    ) -> list[UsageRecord]:
        """Settlement of a stream finishes just after its last byte: poll with a deadline."""
        deadline = time.monotonic() + seconds
        while True:
            records = self.records(org_id)
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def stream(
        self, body: dict[str, Any], *, key: str | None = None, timeout: float = 30
    ) -> tuple[httpx.Response, list[Any]]:
        """POST a streamed call; return the response and its events, each parsed from its
        `data:` line (the closing "[DONE]" as that string). Fails on any other framing."""
        headers = {"Authorization": f"Bearer {key or self.key}"}
        url = f"{self.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            raw = response.read().decode()
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response, []
        return response, sse_events(raw)

    def key_for(self, *, balance: str | None = None, **options: Any) -> str:
        """Another key: of this organization, or of a new one funded with `balance` USD."""
        org = Organization.objects.get(pk=self.org_id)
        if balance is not None:
            n = next(_numbers)
            owner = User.objects.create_user(email=f"other{n}@example.com", password="x-long-pw")
            org = organization_create(slug=f"other{n}", name=f"Other {n}", owner=owner)
            if parse_usd(balance):
                credit_grant(organization=org, amount_nano=parse_usd(balance))
        _key, clear = key_create(organization=org, name="another", **options)
        return clear

    def org_of(self, key: str) -> int:
        return ApiKey.objects.get(key_hash=hash_key(key)).organization_id

    def add_channel(
        self,
        name: str,
        fake: FakeUpstream,
        *,
        priority: int = 0,
        models: dict[str, str] | None = None,
        kind: str = "openai",
        timeout_seconds: float = 5,
    ) -> Channel:
        """One more upstream channel; the in-process route memo is dropped so it counts."""
        channel = channel_add(
            name=name,
            kind=kind,
            base_url=fake.base_url,
            api_key=f"sk-{name}-secret",
            models=models or {"gpt-4o": "gpt-4o-2024-08-06"},
            priority=priority,
            timeout_seconds=timeout_seconds,
        )
        routes_forget()
        return channel

    def set_timeouts(self, seconds: float) -> None:
        """Every channel's first-byte and between-chunks timeout."""
        Channel.objects.update(timeout_seconds=seconds)
        routes_forget()


_numbers = itertools.count(1)


def sse_events(raw: str) -> list[Any]:
    """The events of an SSE body in real200's framing: `data: <json>` and a blank line."""
    assert raw.endswith("\n\n"), f"the stream does not end with a whole event: {raw[-200:]!r}"
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: "), f"not a data line: {block!r}"
        assert "\n" not in block, f"more than one line in an event: {block!r}"
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def cost_of(record: UsageRecord) -> int:
    """What a usage record's tokens cost at the price version it names."""
    return call_cost_nano(
        prompt_tokens=record.prompt_tokens,
        cached_tokens=record.cached_tokens,
        cache_write_tokens=record.cache_write_tokens,
        completion_tokens=record.completion_tokens,
        rates=Price.objects.get(pk=record.price_id),
    )


def assert_books_clean(seconds: float = 5.0) -> None:
    """Every hold closed (settlement may finish just after a test's last byte), the ledger
    agreeing with every balance and with the usage records."""
    deadline = time.monotonic() + seconds
    while Hold.objects.filter(status=HoldStatus.OPEN).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    open_holds = list(Hold.objects.filter(status=HoldStatus.OPEN).values_list("request_id"))
    assert not open_holds, f"holds left open: {open_holds}"
    report = books_check()
    assert report.is_clean, report.problems
    _count, problems = usage_ledger_problems()
    assert not problems, problems


GPT4O_RATES = {"input": "2.50", "cached": "1.25", "output": "10.00"}


@pytest.fixture
def live(transactional_db, real200_url, openai_fake) -> Iterator[Live]:
    owner = User.objects.create_user(email="live@example.com", password="x-long-password")
    org = organization_create(slug="live", name="Live", owner=owner)
    credit_grant(organization=org, amount_nano=parse_usd("10.00"))
    price_set(
        model_name="gpt-4o",
        input_nano_per_mtok=parse_usd(GPT4O_RATES["input"]),
        cached_input_nano_per_mtok=parse_usd(GPT4O_RATES["cached"]),
        output_nano_per_mtok=parse_usd(GPT4O_RATES["output"]),
    )
    LanguageModel.objects.filter(name="gpt-4o").update(max_output_tokens=4096)
    channel_add(
        name="primary",
        kind="openai",
        base_url=openai_fake.base_url,
        api_key="sk-upstream-secret",
        models={"gpt-4o": "gpt-4o-2024-08-06"},
        timeout_seconds=5,
    )
    _key, clear = key_create(organization=org, name="live")
    yield Live(url=real200_url, key=clear, org_id=org.pk, upstream=openai_fake)
    try:
        assert_books_clean()
    finally:
        connections.close_all()


CLAUDE_RATES = {"input": "3.00", "cached": "0.30", "cache_write": "3.75", "output": "15.00"}


@pytest.fixture
def claude(live, anthropic_fake) -> AnthropicFake:
    """`claude-sonnet-4`, priced $3 / $0.30 cache read / $3.75 cache write / $15 per 1M,
    served by an Anthropic fake."""
    price_set(
        model_name="claude-sonnet-4",
        input_nano_per_mtok=parse_usd(CLAUDE_RATES["input"]),
        cached_input_nano_per_mtok=parse_usd(CLAUDE_RATES["cached"]),
        cache_write_nano_per_mtok=parse_usd(CLAUDE_RATES["cache_write"]),
        output_nano_per_mtok=parse_usd(CLAUDE_RATES["output"]),
    )
    live.add_channel(
        "anthropic",
        anthropic_fake,
        kind="anthropic",
        models={"claude-sonnet-4": "claude-sonnet-4-20250514"},
    )
    return anthropic_fake


@pytest.fixture
def backup(live, _openai_servers) -> OpenAIFake:
    """A second OpenAI-shaped channel, tried after the primary."""
    fake = _fresh(_openai_servers[1])
    live.add_channel("backup", fake, priority=-1)
    return fake
