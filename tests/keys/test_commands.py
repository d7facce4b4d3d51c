from __future__ import annotations

import pytest
from django.core.management.base import CommandError

from apps.keys.models import ApiKey, hash_key


def test_create_key_prints_the_full_key_last_and_stores_its_policy(run_command, org):
    lines = run_command(
        "create_key",
        "--org",
        "acme",
        "--name",
        "ci",
        "--rpm",
        "5",
        "--tpm",
        "1000",
        "--models",
        "gpt-4o, claude-sonnet-4",
        "--budget",
        "12.5",
        "--expires-in",
        "30",
        "--ips",
        "10.0.0.0/8,127.0.0.1",
    )
    key = ApiKey.objects.get(key_hash=hash_key(lines[-1]))
    assert (key.name, key.rpm, key.tpm, key.budget_nano) == ("ci", 5, 1000, 12_500_000_000)
    assert key.allowed_models == ["claude-sonnet-4", "gpt-4o"]
    assert key.allowed_ips == ["10.0.0.0/8", "127.0.0.1/32"]
    assert key.expires_at is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--org", "nope"], "no organization"),
        (["--org", "acme", "--budget", "-3"], "negative"),
        (["--org", "acme", "--budget", "ten"], "not an amount"),
        (["--org", "acme", "--rpm", "0"], "rpm must be at least 1"),
        (["--org", "acme", "--expires-in", "0"], "at least 1 day"),
        (["--org", "acme", "--ips", "10.0.0.0/33"], "not an IP"),
    ],
)
def test_create_key_refuses_bad_input(run_command, org, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("create_key", *args)
    assert not ApiKey.objects.exists()


def test_revoke_key_by_each_kind_of_reference(run_command, org):
    for reference in ("clear", "prefix", "id"):
        clear = run_command("create_key", "--org", "acme")[-1]
        key = ApiKey.objects.get(key_hash=hash_key(clear))
        ref = {"clear": clear, "prefix": key.prefix, "id": str(key.pk)}[reference]
        assert run_command("revoke_key", ref)[-1].startswith(f"revoked key {key.pk}")
        key.refresh_from_db()
        assert key.is_revoked


def test_revoke_key_refuses_an_unknown_key(run_command, org):
    with pytest.raises(CommandError, match="no key matches"):
        run_command("revoke_key", "sk-real200-doesnotexist")
