"""Reads on organizations, and the one check of who may act in which organization."""

from __future__ import annotations

from collections.abc import Collection

from django.core.exceptions import PermissionDenied
from django.http import Http404

from apps.tenancy.models import Membership, Organization, User


def organization_get_by_slug(*, slug: str) -> Organization | None:
    return Organization.objects.filter(slug=slug).first()


def membership_get(
    *, user: User, org_slug: str, roles: Collection[str] | None = None
) -> Membership:
    """The user's membership of the organization `org_slug`, with its organization.

    The chokepoint of every dashboard action on an organization. An organization that does
    not exist and one the user does not belong to raise the same Http404, so an outsider
    learns nothing; a member whose role is not in `roles` (None: any role) gets
    PermissionDenied. One condition per line: each has its test.
    """
    if not user.is_authenticated:
        raise Http404("no such organization")
    membership = (
        Membership.objects.select_related("organization")
        .filter(user_id=user.pk, organization__slug=org_slug)
        .first()
    )
    if membership is None:
        raise Http404("no such organization")
    if roles is not None and membership.role not in roles:
        raise PermissionDenied("your role in this organization does not allow this")
    return membership
