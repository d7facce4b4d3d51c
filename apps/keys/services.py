"""Creating and revoking API keys."""

from __future__ import annotations

import ipaddress
import secrets
import string
from datetime import datetime

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from apps.keys.models import (
    KEY_DISPLAY_CHARS,
    KEY_PREFIX,
    KEY_RANDOM_LENGTH,
    ApiKey,
    BudgetPeriod,
    hash_key,
)
from apps.keys.selectors import grant_cache_key
from apps.tenancy.models import Organization, User

_BASE62 = string.ascii_letters + string.digits


class KeyPolicyError(ValueError):
    """A key policy value that cannot be used (the message says which and why)."""


def generate_clear_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_BASE62) for _ in range(KEY_RANDOM_LENGTH))


def normalize_cidrs(cidrs: list[str]) -> list[str]:
    """Each entry as a canonical network (`10.0.0.1` → `10.0.0.1/32`); bad entries refused."""
    networks = []
    for raw in cidrs:
        try:
            networks.append(str(ipaddress.ip_network(raw.strip(), strict=False)))
        except ValueError:
            raise KeyPolicyError(f"{raw!r} is not an IP address or CIDR range") from None
    return networks


def key_create(
    *,
    organization: Organization,
    name: str = "",
    created_by: User | None = None,
    allowed_models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_nano: int | None = None,
    budget_period: str = BudgetPeriod.LIFETIME,
    expires_at: datetime | None = None,
    allowed_ips: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it with its clear text, which exists nowhere else afterwards."""
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise KeyPolicyError(f"{label} must be at least 1")
    if budget_nano is not None and budget_nano < 0:
        raise KeyPolicyError("budget must not be negative")
    if expires_at is not None and expires_at <= timezone.now():
        raise KeyPolicyError("expiry must be in the future")
    clear = generate_clear_key()
    key = ApiKey.objects.create(
        organization=organization,
        name=name,
        key_hash=hash_key(clear),
        prefix=clear[: len(KEY_PREFIX) + KEY_DISPLAY_CHARS],
        last_four=clear[-4:],
        created_by=created_by,
        allowed_models=sorted(set(allowed_models or [])),
        rpm=rpm,
        tpm=tpm,
        budget_nano=budget_nano,
        budget_period=budget_period,
        expires_at=expires_at,
        allowed_ips=normalize_cidrs(allowed_ips or []),
    )
    _forget_grant(key)  # a lookup made before the key existed may have cached "missing"
    return key, clear


def _forget_grant(key: ApiKey) -> None:
    """Drop the cached grant once the change is committed, so every process reads it anew."""
    transaction.on_commit(lambda: cache.delete(grant_cache_key(key.key_hash)), robust=True)


def key_revoke(*, key: ApiKey) -> ApiKey:
    """Revoke a key (idempotent: a revoked key keeps its first revocation time).

    Effective on every process within a second: the shared cache entry is dropped at
    commit, and per-process memos live one second at most.
    """
    ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    key.refresh_from_db(fields=["revoked_at"])
    _forget_grant(key)
    return key
