from __future__ import annotations

import pytest
from django.core.management.base import CommandError

from apps.tenancy.models import Membership, Organization, Role, User


def test_create_org_creates_the_owner_when_new(run_command):
    lines = run_command("create_org", "acme", "--name", "Acme Inc", "--owner", "Boss@Example.com")
    assert lines[-1] == "created organization acme owned by boss@example.com"
    membership = Membership.objects.get()
    assert (membership.user.email, membership.organization.name, membership.role) == (
        "boss@example.com",
        "Acme Inc",
        Role.OWNER,
    )
    assert not membership.user.has_usable_password()


def test_create_org_reuses_an_existing_user(run_command, owner):
    run_command("create_org", "second", "--name", "Second", "--owner", owner.email)
    assert User.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Not A Slug", "--name", "x", "--owner", "a@example.com"], "not a valid slug"),
        (["acme", "--name", "x", "--owner", "not-an-email"], "not an email"),
    ],
)
def test_create_org_refuses_bad_input_and_creates_nothing(run_command, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("create_org", *args)
    assert not User.objects.exists()
    assert not Organization.objects.exists()


def test_create_org_refuses_a_taken_slug(run_command, org):
    with pytest.raises(CommandError, match="already exists"):
        run_command("create_org", "acme", "--name", "x", "--owner", "new@example.com")
    assert not User.objects.filter(email="new@example.com").exists()
