"""A live real200 (uvicorn in a thread of the test process) and fake upstreams.

Live tests commit their rows so the server's own connections see them: they use
`transactional_db` and so need PostgreSQL (the embedded SQLite test database is flushed
with DELETE, which the ledger's immutability trigger refuses, by design).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from django.db import connections
from openai import OpenAI

from apps.billing.models import Account, Transfer
from apps.billing.money import parse_usd
from apps.billing.services import credit_grant
from apps.catalog.models import LanguageModel
from apps.catalog.services import channel_add, price_set
from apps.keys.services import key_create
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from apps.usage.models import UsageRecord
from tests.fakes.upstreams import AnthropicFake, OpenAIFake
from tests.servers import free_port


@pytest.fixture(scope="session")
def real200_url() -> Iterator[str]:
    from config.asgi import application

    port = free_port()
    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        loop="asyncio",
        http="httptools",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="real200-live", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the live real200 did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def openai_fake() -> Iterator[OpenAIFake]:
    with OpenAIFake() as fake:
        yield fake


@pytest.fixture
def anthropic_fake() -> Iterator[AnthropicFake]:
    with AnthropicFake() as fake:
        yield fake


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
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=30, **kwargs
        )

    def balance_nano(self) -> int:
        return Account.objects.get(organization_id=self.org_id).balance_nano

    def held_nano(self) -> int:
        return Account.objects.get(organization_id=self.org_id).held_nano

    def ledger_size(self) -> int:
        return Transfer.objects.count()

    def records(self) -> list[UsageRecord]:
        return list(UsageRecord.objects.filter(organization_id=self.org_id).order_by("pk"))

    def wait_settled(self, count: int = 1, seconds: float = 5.0) -> list[UsageRecord]:
        """Settlement of a stream finishes just after its last byte: poll with a deadline."""
        deadline = time.monotonic() + seconds
        while True:
            records = self.records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)


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
    connections.close_all()
