from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.apps import apps
from django.utils import timezone

from apps.keys.models import ApiKey, hash_key
from apps.keys.selectors import KeyNotFound, key_get_by_reference
from apps.keys.services import KeyPolicyError, key_create, key_revoke

KEY_RE = re.compile(r"^sk-real200-[A-Za-z0-9]{48}$")


def test_a_new_key_has_the_promised_shape_and_only_its_hash_is_kept(org):
    key, clear = key_create(organization=org, name="ci")
    assert KEY_RE.match(clear)
    assert key.key_hash == hash_key(clear)
    assert key.display == f"{clear[:19]}…{clear[-4:]}"
    assert key_create(organization=org)[1] != clear


def test_the_clear_key_is_nowhere_in_the_database(org):
    _key, clear = key_create(organization=org, name="secret")
    random_part = clear.removeprefix("sk-real200-")
    for model in apps.get_models():
        for row in model.objects.all().values():
            dumped = repr(row)
            assert random_part not in dumped, f"{model.__name__} holds the clear key"
            assert random_part[8:-4] not in dumped


def test_policy_values_are_checked_and_ip_ranges_normalised(org):
    key, _ = key_create(
        organization=org, allowed_ips=["10.0.0.1", "192.168.0.0/16"], allowed_models=["b", "a", "a"]
    )
    assert key.allowed_ips == ["10.0.0.1/32", "192.168.0.0/16"]
    assert key.allowed_models == ["a", "b"]
    assert key.allows_ip("192.168.3.4")
    assert not key.allows_ip("172.16.0.1")
    assert not key.allows_ip("junk")
    assert key.allows_model("a")
    assert not key.allows_model("c")
    for bad in (
        {"allowed_ips": ["10.0.0.300"]},
        {"rpm": 0},
        {"tpm": -5},
        {"budget_nano": -1},
        {"expires_at": timezone.now() - timedelta(seconds=1)},
    ):
        with pytest.raises(KeyPolicyError):
            key_create(organization=org, **bad)


def test_a_key_is_found_by_its_text_its_prefix_or_its_id(org):
    key, clear = key_create(organization=org)
    assert key_get_by_reference(reference=clear) == key
    assert key_get_by_reference(reference=key.prefix) == key
    assert key_get_by_reference(reference=key.display) == key
    assert key_get_by_reference(reference=str(key.pk)) == key
    key_create(organization=org)
    with pytest.raises(KeyNotFound, match="more than one"):
        key_get_by_reference(reference="sk-real200-")
    with pytest.raises(KeyNotFound):
        key_get_by_reference(reference=clear[:-1] + ("x" if clear[-1] != "x" else "y"))


def test_revoking_twice_keeps_the_first_time(api_key):
    key_revoke(key=api_key)
    first = ApiKey.objects.get(pk=api_key.pk).revoked_at
    key_revoke(key=api_key)
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at == first
    assert api_key.is_revoked


@pytest.mark.django_db(transaction=True)  # the lookup reads on a worker thread's connection
@pytest.mark.parametrize("broken", ["aget", "aset"])
def test_a_key_is_still_recognised_while_the_shared_cache_is_down(org, monkeypatch, broken):
    from asgiref.sync import async_to_sync
    from django.core.cache import cache

    from apps.keys.selectors import key_authenticate

    async def down(*args, **kwargs):
        raise ConnectionError("the cache is down")

    monkeypatch.setattr(cache, broken, down)
    key, clear = key_create(organization=org, name="k")
    grant = async_to_sync(key_authenticate)(clear)
    assert grant is not None
    assert grant.id == key.pk
