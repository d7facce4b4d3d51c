"""Helpers for the people half of the dashboard's tests."""

from __future__ import annotations

from django.utils.crypto import get_random_string

from apps.catalog.services import channel_add
from apps.tenancy.models import Membership, Organization, User

ROLES = ("owner", "admin", "developer", "viewer")


def user_with_role(org: Organization, role: str) -> User:
    user = User.objects.create_user(
        email=f"{role}-{get_random_string(6).lower()}@example.com", password="pw-role-1234"
    )
    Membership.objects.create(user=user, organization=org, role=role)
    return user


def make_callable(*model_names: str) -> None:
    """Give priced models a channel, so they count as callable (the catalog's rule)."""
    channel_add(
        name=f"demo-{get_random_string(6)}",
        kind="demo",
        models={name: name for name in model_names},
    )
