"""Organizations and members: create, invite, accept, change roles, remove; each role
allowed and refused as it should be."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import time_machine
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.tenancy.models import Invitation, Membership, Organization, Role, User
from apps.tenancy.services import invitation_create
from tests.dashboard.people import ROLES, user_with_role

pytestmark = pytest.mark.django_db

MANAGERS = {"owner", "admin"}


def _url(name: str, **kwargs) -> str:
    return reverse(name, kwargs={"org_slug": "acme", **kwargs})


@pytest.fixture
def invite(django_capture_on_commit_callbacks):
    """POST the invitation form; the email leaves on commit, which a test's transaction
    never reaches, so the commit callbacks run here."""

    def post(client: Client, email: str, role: str = "developer"):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(_url("member-invite"), {"email": email, "role": role})

    return post


def _link_from_mail() -> str:
    return re.search(r"http://testserver(/invitations/\S+/)", mail.outbox[-1].body).group(1)


# --- Creating organizations -------------------------------------------------------------


def test_the_creator_of_an_organization_is_its_owner(client, owner):
    client.force_login(owner)
    response = client.post(reverse("org-create"), {"name": "Widgets Inc", "slug": ""})
    org = Organization.objects.get(slug="widgets-inc")
    assert response.url == reverse("keys-list", kwargs={"org_slug": "widgets-inc"})
    assert Membership.objects.get(organization=org).role == Role.OWNER
    assert not org.is_personal


def test_an_organization_with_a_chinese_name_gets_an_address_anyway(client, owner):
    client.force_login(owner)
    client.post(reverse("org-create"), {"name": "星河科技", "slug": ""})
    org = Organization.objects.get(name="星河科技")
    assert org.slug == "org" or org.slug.startswith("org-")


def test_a_taken_address_is_refused_on_the_form(client, owner, org):
    client.force_login(owner)
    response = client.post(reverse("org-create"), {"name": "Again", "slug": "acme"})
    assert response.status_code == 200
    assert response.context["form"].errors["slug"]


# --- Who may see and do what ---------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_every_member_sees_the_members_and_only_managers_the_controls(client, org, role):
    client.force_login(user_with_role(org, role))
    response = client.get(_url("members"))
    assert response.status_code == 200
    assert b"owner@example.com" in response.content
    assert (_url("member-invite").encode() in response.content) == (role in MANAGERS)


@pytest.mark.parametrize("role", ROLES)
def test_only_managers_mayinvite(client, org, role, invite):
    client.force_login(user_with_role(org, role))
    assert client.get(_url("member-invite")).status_code == (200 if role in MANAGERS else 403)
    response = invite(client, "new@example.com")
    assert response.status_code == (200 if role in MANAGERS else 403)
    assert Invitation.objects.filter(email="new@example.com").exists() == (role in MANAGERS)


@pytest.mark.parametrize("role", ROLES)
def test_only_managers_may_change_roles_remove_members_or_withdraw_invitations(
    client, owner, org, member, role
):
    client.force_login(user_with_role(org, role))
    target = Membership.objects.get(user=member)
    allowed = role in MANAGERS
    response = client.post(_url("member-role", pk=target.pk), {"role": "viewer"})
    assert response.status_code == (302 if allowed else 403)
    target.refresh_from_db()
    assert (target.role == Role.VIEWER) == allowed
    assert client.get(_url("member-remove", pk=target.pk)).status_code == (200 if allowed else 403)
    invitation, _token = invitation_create(
        actor=Membership.objects.get(user=owner),
        email="pending@example.com",
        role="viewer",
        accept_url=lambda token: token,
    )
    response = client.post(_url("invitation-cancel", pk=invitation.pk))
    assert response.status_code == (302 if allowed else 403)
    assert Invitation.objects.filter(pk=invitation.pk).exists() != allowed
    response = client.post(_url("member-remove", pk=target.pk))
    assert response.status_code == (302 if allowed else 403)
    assert Membership.objects.filter(pk=target.pk).exists() != allowed


# --- Invitations -------------------------------------------------------------------------


def test_an_invitation_is_emailed_with_a_one_time_link_and_shown_once(client, owner, org, invite):
    client.force_login(owner)
    response = invite(client, "New@Example.com", "admin")
    assert response["Cache-Control"] == "no-store"
    (message,) = mail.outbox
    assert message.to == ["new@example.com"]
    link = _link_from_mail()
    assert link in response.content.decode()
    invitation = Invitation.objects.get()
    token = link.split("/")[2]
    assert token not in invitation.token_hash  # only the hash is kept
    assert invitation.role == "admin"
    assert token.encode() not in client.get(_url("members")).content


def test_the_invited_user_signs_up_then_accepts(owner, org, invite):
    inviter = Client()
    inviter.force_login(owner)
    invite(inviter, "newbie@example.com", "viewer")
    link = _link_from_mail()
    guest = Client()
    page = guest.get(link)
    assert page.status_code == 200
    assert "newbie%40example.com" in page.content.decode()  # the sign-up link fills it in
    guest.post(
        reverse("signup") + f"?next={link}",
        {"email": "newbie@example.com", "password": "correct horse battery"},
    )
    response = guest.post(link)
    assert response.url == reverse("keys-list", kwargs={"org_slug": "acme"})
    newbie = User.objects.get(email="newbie@example.com")
    assert Membership.objects.get(user=newbie, organization=org).role == Role.VIEWER
    assert newbie.memberships.count() == 2  # and their personal organization
    assert guest.get(link).status_code == 404  # used once, gone


def test_an_invitation_cannot_be_accepted_twice(owner, org, outsider, invite):
    inviter = Client()
    inviter.force_login(owner)
    invite(inviter, "outsider@example.com", "developer")
    link = _link_from_mail()
    guest = Client()
    guest.force_login(outsider)
    assert guest.post(link).status_code == 302
    Membership.objects.filter(user=outsider, organization=org).delete()
    assert guest.post(link).status_code == 404
    assert not Membership.objects.filter(user=outsider, organization=org).exists()


def test_an_invitation_is_only_for_its_address(owner, org, outsider, invite):
    inviter = Client()
    inviter.force_login(owner)
    invite(inviter, "someone@example.com")
    link = _link_from_mail()
    guest = Client()
    guest.force_login(outsider)
    assert "outsider@example.com" in guest.get(link).content.decode()
    response = guest.post(link)
    assert response.status_code == 400
    assert not Membership.objects.filter(user=outsider, organization=org).exists()
    assert Invitation.objects.get().accepted_at is None  # still there for the right person


def test_an_expired_invitation_no_longer_works(owner, org, outsider, invite):
    inviter = Client()
    inviter.force_login(owner)
    invite(inviter, "outsider@example.com")
    link = _link_from_mail()
    guest = Client()
    guest.force_login(outsider)
    with time_machine.travel(timezone.now() + timedelta(days=8)):
        assert guest.get(link).status_code == 404
        assert guest.post(link).status_code == 404
    assert not Membership.objects.filter(user=outsider, organization=org).exists()


def test_a_withdrawn_invitation_no_longer_works(client, owner, org, invite):
    client.force_login(owner)
    invite(client, "gone@example.com")
    link = _link_from_mail()
    client.post(_url("invitation-cancel", pk=Invitation.objects.get().pk))
    assert Client().get(link).status_code == 404


def test_a_new_invitation_to_the_same_address_replaces_the_pending_one(client, owner, org, invite):
    client.force_login(owner)
    invite(client, "twice@example.com")
    first = _link_from_mail()
    invite(client, "twice@example.com", "viewer")
    assert Client().get(first).status_code == 404
    assert Invitation.objects.get().role == "viewer"


def test_a_member_cannot_be_invited_again(client, owner, org, member, invite):
    client.force_login(owner)
    response = invite(client, "member@example.com")
    assert response.status_code == 200
    assert response.context["form"].non_field_errors()
    assert mail.outbox == []


def test_an_admin_cannot_invite_an_owner(client, org, invite):
    client.force_login(user_with_role(org, "admin"))
    response = invite(client, "boss@example.com", "owner")
    assert response.context["form"].non_field_errors()
    assert not Invitation.objects.exists()


# --- Roles and removal -------------------------------------------------------------------


def test_the_last_owner_can_be_neither_demoted_nor_removed(client, owner, org):
    client.force_login(owner)
    mine = Membership.objects.get(user=owner)
    client.post(_url("member-role", pk=mine.pk), {"role": "admin"})
    client.post(_url("member-remove", pk=mine.pk))
    mine.refresh_from_db()
    assert mine.role == Role.OWNER
    second = user_with_role(org, "owner")
    client.post(_url("member-role", pk=mine.pk), {"role": "admin"})
    mine.refresh_from_db()
    assert mine.role == Role.ADMIN
    assert Membership.objects.get(user=second).role == Role.OWNER


def test_admins_may_not_touch_owners_nor_make_one(client, owner, org, member):
    admin = user_with_role(org, "admin")
    client.force_login(admin)
    owner_membership = Membership.objects.get(user=owner)
    client.post(_url("member-role", pk=owner_membership.pk), {"role": "viewer"})
    client.post(_url("member-remove", pk=owner_membership.pk))
    owner_membership.refresh_from_db()
    assert owner_membership.role == Role.OWNER
    target = Membership.objects.get(user=member)
    client.post(_url("member-role", pk=target.pk), {"role": "owner"})
    target.refresh_from_db()
    assert target.role == Role.DEVELOPER
    client.post(_url("member-role", pk=target.pk), {"role": "admin"})
    target.refresh_from_db()
    assert target.role == Role.ADMIN


def test_an_owner_may_promote_to_owner(client, owner, org, member):
    client.force_login(owner)
    target = Membership.objects.get(user=member)
    client.post(_url("member-role", pk=target.pk), {"role": "owner"})
    target.refresh_from_db()
    assert target.role == Role.OWNER


def test_a_manager_who_leaves_lands_elsewhere(client, owner, org):
    admin = user_with_role(org, "admin")
    client.force_login(admin)
    response = client.post(_url("member-remove", pk=Membership.objects.get(user=admin).pk))
    assert response.url == reverse("dashboard-home")
    assert client.get(_url("members")).status_code == 404


def test_an_unknown_role_is_refused(client, owner, org, member):
    client.force_login(owner)
    target = Membership.objects.get(user=member)
    client.post(_url("member-role", pk=target.pk), {"role": "emperor"})
    target.refresh_from_db()
    assert target.role == Role.DEVELOPER


def test_a_role_change_says_the_new_role(client, owner, org, member):
    client.force_login(owner)
    target = Membership.objects.get(user=member)
    response = client.post(_url("member-role", pk=target.pk), {"role": "viewer"}, follow=True)
    assert "member@example.com is now Viewer." in response.content.decode()
