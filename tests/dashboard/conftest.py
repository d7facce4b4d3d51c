"""Fixtures for the dashboard: a client per test from an address of its own, and Stripe."""

from __future__ import annotations

import itertools

import pytest
from django.test import Client

from tests.fakes.stripe_api import WEBHOOK_SECRET, StripeFake

# Rate-limit counters per address live in the cache, which outlives a test on Redis: each
# test's client comes from its own address, so one test's attempts never limit another's.
_addresses = (f"198.51.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture(autouse=True)
def _static_without_manifest(settings) -> None:
    """Pages link their CSS with {% static %}; tests run no collectstatic, so the manifest
    storage of production would have nothing to look the file up in."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def client() -> Client:
    return Client(REMOTE_ADDR=next(_addresses))


@pytest.fixture
def csrf_client() -> Client:
    return Client(enforce_csrf_checks=True, REMOTE_ADDR=next(_addresses))


@pytest.fixture
def stripe_api(settings):
    with StripeFake() as fake:
        settings.STRIPE_SECRET_KEY = fake.secret_key
        settings.STRIPE_API_BASE = fake.base_url
        settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
        settings.TOPUP_MIN_USD = "5.00"
        settings.TOPUP_MAX_USD = "1000.00"
        yield fake
