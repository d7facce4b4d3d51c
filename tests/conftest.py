"""Shared fixtures: an organization with an owner, a member and an outsider who must see
nothing; a funded organization; a key; a priced model.

Tests marked `postgres` need DATABASE_URL to point at PostgreSQL, and `redis` need
REDIS_URL; without them they are skipped with that reason. CI sets both.
"""

from __future__ import annotations

import os

import pytest
from django.conf import settings as django_settings

from apps.billing.money import parse_usd
from apps.billing.services import credit_grant
from apps.catalog.services import price_set
from apps.keys.services import key_create
from apps.tenancy.models import Membership, Role, User
from apps.tenancy.services import organization_create


def pytest_configure(config) -> None:
    # Each xdist worker has its own test database, whose ids start at 1: give each its
    # own cache namespace on the shared Redis, for this process and the servers it starts.
    prefix = f"test-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}"
    os.environ["CACHE_KEY_PREFIX"] = prefix
    django_settings.CACHE_KEY_PREFIX = prefix  # the rate limiter's counters
    django_settings.CACHES["default"]["KEY_PREFIX"] = prefix
    # Likewise a Celery queue of its own: a worker started by one test process must never
    # take a task meant for another's database.
    os.environ["CELERY_QUEUE"] = prefix
    from config.celery import app as celery_app

    celery_app.conf.task_default_queue = prefix
    # Every test's client is 127.0.0.1, and many send unknown keys on purpose: the limit on
    # them (per address and minute) would carry from test to test. The test of that limit
    # lowers it again, for addresses of its own.
    os.environ["GATEWAY_UNKNOWN_KEYS_PER_MINUTE"] = "1000000"
    django_settings.GATEWAY_UNKNOWN_KEYS_PER_MINUTE = 1_000_000
    # Test servers speak plain HTTP on loopback.
    os.environ["HTTPS"] = "0"
    django_settings.SECURE_SSL_REDIRECT = False


def pytest_collection_modifyitems(config, items) -> None:
    on_postgres = django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL: set DATABASE_URL=postgres://…")
    skip_redis = pytest.mark.skip(reason="needs Redis: set REDIS_URL=redis://…")
    for item in items:
        if "postgres" in item.keywords and not on_postgres:
            item.add_marker(skip_pg)
        if "redis" in item.keywords and not os.environ.get("REDIS_URL"):
            item.add_marker(skip_redis)


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def owner(db) -> User:
    return User.objects.create_user(email="owner@example.com", password="pw-owner-1234")


@pytest.fixture
def member(db, org) -> User:
    user = User.objects.create_user(email="member@example.com", password="pw-member-1234")
    Membership.objects.create(user=user, organization=org, role=Role.DEVELOPER)
    return user


@pytest.fixture
def outsider(db) -> User:
    """A user of another organization: must never see `org`'s objects."""
    user = User.objects.create_user(email="outsider@example.com", password="pw-outsider-1234")
    organization_create(slug="elsewhere", name="Elsewhere", owner=user)
    return user


@pytest.fixture
def org(owner):
    return organization_create(slug="acme", name="Acme", owner=owner)


@pytest.fixture
def funded_org(org):
    credit_grant(organization=org, amount_nano=parse_usd("10.00"), memo="test funding")
    return org


@pytest.fixture
def price(db):
    """gpt-4o at $2.50 in, $1.25 cached in, $10.00 out per million tokens."""
    return price_set(
        model_name="gpt-4o",
        input_nano_per_mtok=parse_usd("2.50"),
        cached_input_nano_per_mtok=parse_usd("1.25"),
        output_nano_per_mtok=parse_usd("10.00"),
    )


@pytest.fixture
def api_key(org):
    key, _clear = key_create(organization=org, name="test key")
    return key


@pytest.fixture
def run_command(db):
    """Run a management command; return its output lines (the result is the last)."""
    from io import StringIO

    from django.core.management import call_command

    def run(*args: str) -> list[str]:
        out = StringIO()
        call_command(*args, stdout=out, stderr=StringIO())
        return out.getvalue().splitlines()

    return run


@pytest.fixture(autouse=True)
def _forget_process_memos():
    """Per-process memos (system accounts, routes, key grants, key use, rate counters)
    outlive a test's rolled-back rows; start every test without them."""
    from django.core.cache import cache

    from apps.billing.services import system_accounts_forget
    from apps.catalog.selectors import routes_forget
    from apps.keys.limits import counters_forget
    from apps.keys.selectors import grants_forget
    from apps.usage.services import key_use_forget

    memos = (system_accounts_forget, routes_forget, grants_forget, key_use_forget, counters_forget)
    for forget in memos:
        forget()
    yield
    for forget in memos:
        forget()
    if not django_settings.REDIS_URL:  # Redis keeps per-worker keys; see pytest_configure
        cache.clear()
