"""Reads on organizations."""

from __future__ import annotations

from apps.tenancy.models import Organization


def organization_get_by_slug(*, slug: str) -> Organization | None:
    return Organization.objects.filter(slug=slug).first()
