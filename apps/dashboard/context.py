"""Template context for every dashboard page: the organization being worked in, the
user's other organizations (for the switcher), and what the member's role allows."""

from __future__ import annotations

from django.http import HttpRequest

from apps.dashboard.access import CAN_MANAGE_KEYS, CAN_MANAGE_MEMBERS, CAN_TOP_UP, can
from apps.tenancy.models import Membership


def dashboard(request: HttpRequest) -> dict:
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    return {
        "current_org": getattr(request, "org", None),
        "current_membership": getattr(request, "membership", None),
        "my_memberships": Membership.objects.filter(user=request.user)
        .select_related("organization")
        .order_by("organization__name"),
        "can_manage_keys": can(request, CAN_MANAGE_KEYS),
        "can_top_up": can(request, CAN_TOP_UP),
        "can_manage_members": can(request, CAN_MANAGE_MEMBERS),
    }
