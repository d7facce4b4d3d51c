"""Creating, changing and revoking API keys."""

from __future__ import annotations

import ipaddress
import secrets
import string
from datetime import datetime

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

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
            raise KeyPolicyError(
                _("%(value)r is not an IP address or CIDR range") % {"value": raw}
            ) from None
    return networks


def _check_policy(
    *,
    rpm: int | None,
    tpm: int | None,
    budget_nano: int | None,
    budget_period: str,
    expires_at: datetime | None,
) -> None:
    """The rules every key's policy obeys, at creation and at each change."""
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise KeyPolicyError(_("%(label)s must be at least 1") % {"label": label})
    if budget_nano is not None and budget_nano < 0:
        raise KeyPolicyError(_("budget must not be negative"))
    if budget_period not in BudgetPeriod.values:
        raise KeyPolicyError(_("unknown budget period"))
    if expires_at is not None and expires_at <= timezone.now():
        raise KeyPolicyError(_("expiry must be in the future"))


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
    _check_policy(
        rpm=rpm,
        tpm=tpm,
        budget_nano=budget_nano,
        budget_period=budget_period,
        expires_at=expires_at,
    )
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


@transaction.atomic
def key_update_policy(
    *,
    key: ApiKey,
    name: str,
    allowed_models: list[str],
    rpm: int | None,
    tpm: int | None,
    budget_nano: int | None,
    budget_period: str,
    expires_at: datetime | None,
    allowed_ips: list[str],
) -> ApiKey:
    """Replace a key's name and policy, checked as at creation. A revoked key stays as it
    was. Every process sees the new policy within a second, as with a revocation: the
    shared cache entry is dropped at commit and per-process memos live a second at most.
    """
    locked = ApiKey.objects.select_for_update().get(pk=key.pk)
    if locked.is_revoked:
        raise KeyPolicyError(_("a revoked key cannot be changed"))
    _check_policy(
        rpm=rpm,
        tpm=tpm,
        budget_nano=budget_nano,
        budget_period=budget_period,
        # An expiry left as it was may have passed; only a new one must lie ahead.
        expires_at=expires_at if expires_at != locked.expires_at else None,
    )
    ips = normalize_cidrs(allowed_ips)
    locked.name = name
    locked.allowed_models = sorted(set(allowed_models))
    locked.rpm = rpm
    locked.tpm = tpm
    locked.budget_nano = budget_nano
    locked.budget_period = budget_period
    locked.expires_at = expires_at
    locked.allowed_ips = ips
    locked.save(
        update_fields=[
            "name",
            "allowed_models",
            "rpm",
            "tpm",
            "budget_nano",
            "budget_period",
            "expires_at",
            "allowed_ips",
        ]
    )
    _forget_grant(locked)
    return locked


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
