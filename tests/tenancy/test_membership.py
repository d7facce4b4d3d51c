"""The one check of who may act in which organization: every branch."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import PermissionDenied
from django.http import Http404

from apps.tenancy.models import Membership, Role
from apps.tenancy.selectors import membership_get

MONEY_ROLES = (Role.OWNER, Role.ADMIN)


def test_a_member_with_an_allowed_role_gets_the_membership_and_its_organization(owner, org):
    membership = membership_get(user=owner, org_slug="acme", roles=MONEY_ROLES)
    assert (membership.user, membership.organization, membership.role) == (owner, org, "owner")


def test_without_roles_any_member_passes(member, org):
    assert membership_get(user=member, org_slug="acme").role == Role.DEVELOPER


def test_a_member_whose_role_is_not_allowed_is_refused(member):
    with pytest.raises(PermissionDenied):
        membership_get(user=member, org_slug="acme", roles=MONEY_ROLES)


@pytest.mark.parametrize("slug", ["acme", "no-such-org", ""])
def test_an_outsider_cannot_tell_an_organization_of_others_from_none(outsider, org, slug):
    with pytest.raises(Http404) as refused:
        membership_get(user=outsider, org_slug=slug, roles=MONEY_ROLES)
    assert str(refused.value) == "no such organization"


def test_an_anonymous_visitor_belongs_nowhere(org):
    with pytest.raises(Http404):
        membership_get(user=AnonymousUser(), org_slug="acme")


def test_membership_is_per_organization(owner, org, outsider):
    elsewhere = outsider.memberships.get().organization
    Membership.objects.create(user=owner, organization=elsewhere, role=Role.VIEWER)
    assert membership_get(user=owner, org_slug="acme", roles=MONEY_ROLES).organization == org
    with pytest.raises(PermissionDenied):
        membership_get(user=owner, org_slug=elsewhere.slug, roles=MONEY_ROLES)
