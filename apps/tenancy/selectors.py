"""Reads on organizations, and the one check of who may act in which organization."""

from __future__ import annotations

from collections.abc import Collection

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404
from django.utils import timezone

from apps.tenancy.models import (
    Invitation,
    Membership,
    Organization,
    User,
    hash_invitation_token,
)


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


def membership_default(*, user: User, preferred_slug: str | None) -> Membership | None:
    """Where the user lands: the organization they last worked in if they still belong
    to it, else their personal one, else any (None if they belong nowhere)."""
    memberships = Membership.objects.select_related("organization").filter(user_id=user.pk)
    if preferred_slug:
        last = memberships.filter(organization__slug=preferred_slug).first()
        if last is not None:
            return last
    return memberships.order_by("-organization__is_personal", "created_at").first()


def membership_list_for_org(*, organization: Organization) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(organization=organization)
        .select_related("user")
        .order_by("created_at", "pk")
    )


def membership_get_in_org(*, organization: Organization, membership_id: int) -> Membership:
    """A membership of `organization` by id; any other id, another organization's
    included, is the same Http404."""
    membership = (
        Membership.objects.select_related("user", "organization")
        .filter(pk=membership_id, organization=organization)
        .first()
    )
    if membership is None:
        raise Http404("no such member")
    return membership


def invitation_list_pending(*, organization: Organization) -> QuerySet[Invitation]:
    return (
        Invitation.objects.filter(
            organization=organization, accepted_at__isnull=True, expires_at__gt=timezone.now()
        )
        .select_related("invited_by")
        .order_by("-created_at")
    )


def invitation_get_in_org(*, organization: Organization, invitation_id: int) -> Invitation:
    """A pending invitation of `organization` by id; anything else is the same Http404."""
    invitation = Invitation.objects.filter(
        pk=invitation_id, organization=organization, accepted_at__isnull=True
    ).first()
    if invitation is None:
        raise Http404("no such invitation")
    return invitation


def invitation_get_open_by_token(*, token: str) -> Invitation | None:
    """The open invitation a link carries, with its organization; None if the link is
    unknown, used or expired (all alike to whoever holds it)."""
    invitation = (
        Invitation.objects.select_related("organization", "invited_by")
        .filter(token_hash=hash_invitation_token(token))
        .first()
    )
    if invitation is None or not invitation.is_open(timezone.now()):
        return None
    return invitation
