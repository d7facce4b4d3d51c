"""Sign-up, invitations and membership changes, at the service level: what they promise
under retries and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.tenancy.models import Invitation, Membership, Organization, Role, User
from apps.tenancy.services import (
    TenancyError,
    invitation_accept,
    invitation_create,
    membership_remove,
    membership_set_role,
    organization_create,
    user_sign_up,
)


def _invite(org: Organization, email: str, role: str = Role.DEVELOPER) -> str:
    actor = Membership.objects.get(organization=org, role=Role.OWNER)
    _invitation, token = invitation_create(
        actor=actor, email=email, role=role, accept_url=lambda token: f"/i/{token}"
    )
    return token


@pytest.mark.django_db
def test_sign_up_makes_the_user_the_owner_of_a_personal_organization():
    user = user_sign_up(email=" Zoe@Example.COM", password="a long enough one")
    assert user.email == "zoe@example.com"
    assert user.check_password("a long enough one")
    membership = user.memberships.get()
    assert (membership.role, membership.organization.is_personal) == (Role.OWNER, True)
    assert membership.organization.name == "zoe@example.com"


@pytest.mark.django_db
def test_a_derived_slug_never_takes_one_in_use(owner):
    organization_create(slug="zoe", name="Taken", owner=owner)
    org = organization_create(slug=None, name="Zoe", owner=owner)
    assert org.slug.startswith("zoe-")
    assert organization_create(slug=None, name="星河", owner=owner).slug == "org"


@pytest.mark.django_db
def test_only_the_hash_of_the_token_is_stored(org):
    token = _invite(org, "a@example.com")
    stored = Invitation.objects.get()
    assert token not in stored.token_hash
    assert len(stored.token_hash) == 64


@pytest.mark.django_db
def test_accepting_is_refused_once_used_expired_or_for_someone_else(org, outsider, member):
    token = _invite(org, "outsider@example.com")
    with pytest.raises(TenancyError, match=r"for outsider@example\.com"):
        invitation_accept(token=token, user=member)
    invitation_accept(token=token, user=outsider)
    with pytest.raises(TenancyError, match="no longer valid"):
        invitation_accept(token=token, user=outsider)
    late = _invite(org, "late@example.com")
    Invitation.objects.filter(email="late@example.com").update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    late_user = User.objects.create_user(email="late@example.com", password="x")
    with pytest.raises(TenancyError, match="no longer valid"):
        invitation_accept(token=late, user=late_user)
    with pytest.raises(TenancyError):
        invitation_accept(token="made-up", user=late_user)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_one_link_followed_many_times_at_once_joins_once(owner, org):
    """Concurrent accepts with one token: the conditional update lets exactly one win."""
    guest = User.objects.create_user(email="guest@example.com", password="x")
    token = _invite(org, "guest@example.com")
    start = threading.Barrier(8)

    def accept(_i: int) -> str:
        start.wait()
        try:
            invitation_accept(token=token, user=guest)
        except TenancyError:
            return "refused"
        else:
            return "joined"
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(accept, range(8)))
    assert results.count("joined") == 1
    assert Membership.objects.filter(user=guest, organization=org).count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_owners_demoting_each_other_at_once_leave_one_owner(owner, org):
    second = User.objects.create_user(email="second@example.com", password="x")
    Membership.objects.create(user=second, organization=org, role=Role.OWNER)
    a = Membership.objects.get(user=owner)
    b = Membership.objects.get(user=second)
    start = threading.Barrier(2)

    def demote(actor: Membership, target: Membership) -> None:
        start.wait()
        try:
            membership_set_role(actor=actor, membership=target, role=Role.ADMIN)
        except TenancyError:
            pass
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(demote, [a, b], [b, a]))
    assert Membership.objects.filter(organization=org, role=Role.OWNER).count() == 1


@pytest.mark.django_db
def test_the_last_owner_stays(owner, org, member):
    mine = Membership.objects.get(user=owner)
    with pytest.raises(TenancyError, match="at least one owner"):
        membership_remove(actor=mine, membership=mine)
    with pytest.raises(TenancyError, match="at least one owner"):
        membership_set_role(actor=mine, membership=mine, role=Role.VIEWER)
    membership_remove(actor=mine, membership=Membership.objects.get(user=member))
    assert list(org.memberships.values_list("role", flat=True)) == [Role.OWNER]
