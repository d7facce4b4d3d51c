"""Changing a key's policy: checked as at creation, refused for a revoked key."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.keys.services import KeyPolicyError, key_revoke, key_update_policy

POLICY = {
    "name": "k",
    "allowed_models": [],
    "rpm": None,
    "tpm": None,
    "budget_nano": None,
    "budget_period": "lifetime",
    "expires_at": None,
    "allowed_ips": [],
}


@pytest.mark.parametrize(
    "change",
    [
        {"rpm": 0},
        {"tpm": 0},
        {"budget_nano": -1},
        {"budget_period": "weekly"},
        {"allowed_ips": ["10.0.0.300"]},
        {"expires_at": timezone.now() - timedelta(minutes=1)},
    ],
)
def test_a_policy_change_is_checked_as_at_creation(api_key, change):
    with pytest.raises(KeyPolicyError):
        key_update_policy(key=api_key, **{**POLICY, **change})
    api_key.refresh_from_db()
    assert api_key.name == "test key"


def test_a_policy_change_is_saved_whole(api_key):
    key = key_update_policy(
        key=api_key,
        **{
            **POLICY,
            "allowed_models": ["b", "a", "a"],
            "rpm": 7,
            "allowed_ips": ["192.0.2.1"],
        },
    )
    api_key.refresh_from_db()
    assert (api_key.allowed_models, api_key.rpm, api_key.allowed_ips) == (
        ["a", "b"],
        7,
        ["192.0.2.1/32"],
    )
    assert key.pk == api_key.pk


def test_a_revoked_key_keeps_its_policy(api_key):
    key_revoke(key=api_key)
    with pytest.raises(KeyPolicyError, match="revoked"):
        key_update_policy(key=api_key, **{**POLICY, "rpm": 9})
