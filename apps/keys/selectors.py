"""Reads on API keys."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.db.models import QuerySet
from django.http import Http404

from apps.keys.models import KEY_PREFIX, KEY_RANDOM_LENGTH, ApiKey, hash_key, ip_in_ranges
from apps.tenancy.models import Organization
from config.asyncdb import SingleFlight, db_step

logger = logging.getLogger(__name__)

KEY_SHAPE = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9]{{{KEY_RANDOM_LENGTH}}}$")


class KeyNotFound(LookupError):
    pass


class KeyLookupRefused(Exception):
    """The key is in no cache, and the caller may not have it looked up in the database."""


def key_list_for_org(*, organization: Organization) -> QuerySet[ApiKey]:
    """An organization's keys, newest first, revoked ones included."""
    return ApiKey.objects.filter(organization=organization).order_by("-created_at", "-pk")


def key_get_in_org(*, organization: Organization, key_id: int) -> ApiKey:
    """One of `organization`'s keys by id. A key of another organization and no key at
    all raise the same Http404: the dashboard reaches keys only through here."""
    key = ApiKey.objects.filter(pk=key_id, organization=organization).first()
    if key is None:
        raise Http404("no such key")
    return key


def key_get_by_reference(*, reference: str) -> ApiKey:
    """The key an operator names by its full text, its display prefix, or its id.

    An ambiguous prefix is refused rather than guessed.
    """
    reference = reference.strip()
    if reference.isdigit():
        key = ApiKey.objects.filter(pk=int(reference)).first()
    elif reference.startswith(KEY_PREFIX) and len(reference) > 32:
        key = ApiKey.objects.filter(key_hash=hash_key(reference)).first()
    else:
        prefix = reference.split("…")[0]
        matches = list(ApiKey.objects.filter(prefix__startswith=prefix)[:2]) if prefix else []
        if len(matches) > 1:
            raise KeyNotFound(f"{reference!r} matches more than one key; give the id instead")
        key = matches[0] if matches else None
    if key is None:
        raise KeyNotFound(f"no key matches {reference!r}")
    return key


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a request authenticated by one key may do: a cacheable copy of the key's row."""

    id: int
    organization_id: int
    display: str
    revoked: bool
    expires_at: datetime | None
    allowed_models: tuple[str, ...]
    allowed_ips: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    budget_nano: int | None
    budget_period: str
    org_rpm: int | None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def allows_ip(self, ip: str) -> bool:
        return ip_in_ranges(ip, self.allowed_ips)

    @classmethod
    def of(cls, key: ApiKey) -> KeyGrant:
        return cls(
            id=key.pk,
            organization_id=key.organization_id,
            display=key.display,
            revoked=key.is_revoked,
            expires_at=key.expires_at,
            allowed_models=tuple(key.allowed_models),
            allowed_ips=tuple(key.allowed_ips),
            rpm=key.rpm,
            tpm=key.tpm,
            budget_nano=key.budget_nano,
            budget_period=key.budget_period,
            org_rpm=key.organization.rpm_limit or settings.ORG_DEFAULT_RPM,
        )


# Two cache levels. The shared cache (Redis in production) answers for a minute and is
# cleared by every change to a key, on every process at once. A per-process memo saves
# that round trip for at most LOCAL_TTL seconds: the bound on how long a revoked key can
# still pass on a process that has just seen it.
SHARED_TTL = 60
LOCAL_TTL = 1.0
_MISSING = "missing"
_local: dict[str, tuple[float, KeyGrant | None]] = {}
_lookups = SingleFlight()


def grant_cache_key(key_hash: str) -> str:
    return f"apikey:{key_hash}"


def _grant_from_db(key_hash: str) -> KeyGrant | None:
    key = ApiKey.objects.filter(key_hash=key_hash).select_related("organization").first()
    return KeyGrant.of(key) if key is not None else None


async def key_authenticate(clear_key: str, *, look_up: bool = True) -> KeyGrant | None:
    """The grant of a well-formed, known key (revoked and expired ones included: the
    caller refuses them with their own message), or None. With `look_up=False` a key
    that is in no cache raises KeyLookupRefused instead of costing a query."""
    if not KEY_SHAPE.match(clear_key):
        return None
    key_hash = hash_key(clear_key)
    memo = _local.get(key_hash)
    if memo is not None and memo[0] > time.monotonic():
        return memo[1]
    return await _lookups.run(key_hash, lambda: _grant_remembered(key_hash, look_up))


async def _grant_remembered(key_hash: str, look_up: bool) -> KeyGrant | None:
    grant = await _grant_shared(key_hash, look_up)
    if len(_local) > 10_000:  # bound the memo; a flood of distinct bad keys cannot grow it
        _local.clear()
    _local[key_hash] = (time.monotonic() + LOCAL_TTL, grant)
    return grant


async def _grant_shared(key_hash: str, look_up: bool) -> KeyGrant | None:
    """The grant from the shared cache, or from the database into the shared cache."""
    try:
        cached = await cache.aget(grant_cache_key(key_hash))
    except Exception as error:  # the shared cache is down: ask the database
        logger.error("key cache unavailable, reading the database: %s", error)
        return await _grant_looked_up(key_hash, look_up)
    if cached is not None:
        return None if cached == _MISSING else cached
    grant = await _grant_looked_up(key_hash, look_up)
    try:
        await cache.aset(grant_cache_key(key_hash), grant or _MISSING, SHARED_TTL)
    except Exception as error:  # went down meanwhile: the grant read is still good
        logger.error("key cache unavailable, not remembering the key: %s", error)
    return grant


async def _grant_looked_up(key_hash: str, look_up: bool) -> KeyGrant | None:
    if not look_up:
        raise KeyLookupRefused
    return await db_step(_grant_from_db, key_hash)


def grants_forget() -> None:
    """Drop this process's memo of key grants (tests)."""
    _local.clear()
    _lookups.forget()
