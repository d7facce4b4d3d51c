"""API keys: `sk-real200-` followed by random base62 characters, stored only as a hash."""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from apps.tenancy.models import Organization

KEY_PREFIX = "sk-real200-"
KEY_RANDOM_LENGTH = 48  # base62: 48 characters carry about 285 bits
KEY_DISPLAY_CHARS = 8  # random characters kept in clear after KEY_PREFIX, to tell keys apart


def hash_key(clear_key: str) -> str:
    """SHA-256 hex of a clear key: what the database keeps and what lookups compare.

    A fast hash is right here (unlike passwords): the key carries ~285 random bits, so
    there is nothing to brute-force, and the hot path hashes on every call.
    """
    return hashlib.sha256(clear_key.encode()).hexdigest()


def ip_in_ranges(ip: str, cidrs: list[str] | tuple[str, ...]) -> bool:
    """Whether `ip` falls in any of the CIDR ranges; no ranges means no restriction."""
    if not cidrs:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


class BudgetPeriod(models.TextChoices):
    LIFETIME = "lifetime", _("For the key's lifetime")
    MONTHLY = "monthly", _("Per calendar month")


class ApiKey(models.Model):
    """A customer's key. Its clear text is shown once, at creation, and never stored.

    Policy fields: an empty `allowed_models` or `allowed_ips` means no restriction;
    null `rpm`, `tpm` or `budget_nano` means no limit. `budget_nano` is in nano-dollars
    (see apps/billing/money.py) over `budget_period`.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=32, db_index=True)  # "sk-real200-" + 8 characters
    last_four = models.CharField(max_length=4)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    allowed_models = models.JSONField(default=list, blank=True)
    rpm = models.PositiveIntegerField(null=True, blank=True)
    tpm = models.PositiveIntegerField(null=True, blank=True)
    budget_nano = models.BigIntegerField(null=True, blank=True)
    budget_period = models.CharField(
        max_length=16, choices=BudgetPeriod.choices, default=BudgetPeriod.LIFETIME
    )
    allowed_ips = models.JSONField(default=list, blank=True)  # CIDR strings

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(budget_nano__isnull=True) | models.Q(budget_nano__gte=0),
                name="key_budget_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.display

    @property
    def display(self) -> str:
        return f"{self.prefix}…{self.last_four}"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def status(self, now: datetime) -> str:
        """ "revoked", "expired" or "active" (a revoked key reads as revoked even when its
        expiry has passed too: revocation is the deliberate act)."""
        if self.is_revoked:
            return "revoked"
        if self.is_expired(now):
            return "expired"
        return "active"

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def allows_ip(self, ip: str) -> bool:
        return ip_in_ranges(ip, self.allowed_ips)
