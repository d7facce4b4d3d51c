"""Writes on users, organizations and memberships."""

from __future__ import annotations

from django.db import transaction
from django.utils.text import slugify

from apps.tenancy.models import Membership, Organization, Role, User


class TenancyError(ValueError):
    """A request that cannot be carried out as asked (the message says why)."""


def user_get_or_create(*, email: str) -> tuple[User, bool]:
    """The user with this email, created without a usable password if new."""
    email = User.objects.normalize_email(email).lower()
    user = User.objects.filter(email=email).first()
    if user is not None:
        return user, False
    return User.objects.create_user(email=email, password=None), True


@transaction.atomic
def organization_create(
    *, slug: str, name: str, owner: User, is_personal: bool = False
) -> Organization:
    """A new organization with `owner` as its first member (role owner)."""
    if slug != slugify(slug) or not slug:
        raise TenancyError(f"{slug!r} is not a valid slug (lowercase letters, digits, hyphens)")
    if Organization.objects.filter(slug=slug).exists():
        raise TenancyError(f"an organization with slug {slug!r} already exists")
    org = Organization.objects.create(slug=slug, name=name, is_personal=is_personal)
    Membership.objects.create(user=owner, organization=org, role=Role.OWNER)
    return org
