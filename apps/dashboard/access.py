"""Who may do what in the dashboard, and the one way a view reaches an organization.

Every page that shows or changes an organization's objects is under `/o/<org_slug>/` and
goes through `org_view`, which resolves the membership with `membership_get` (an outsider
gets 404, a member without the role 403) before the view runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse

from apps.tenancy.models import Role
from apps.tenancy.selectors import membership_get

ANY_ROLE: tuple[str, ...] = tuple(Role.values)
CAN_MANAGE_KEYS = (Role.OWNER, Role.ADMIN, Role.DEVELOPER)
CAN_TOP_UP = (Role.OWNER, Role.ADMIN)
CAN_MANAGE_MEMBERS = (Role.OWNER, Role.ADMIN)
CAN_MANAGE_ORGANIZATION = (Role.OWNER,)

LAST_ORG_SESSION_KEY = "dashboard_org"


def org_view(roles: Collection[str] = ANY_ROLE) -> Callable:
    """Decorate a view taking `org_slug`: login required, then the membership check.

    Sets `request.membership` and `request.org`, and remembers the organization as the
    one the user is working in.
    """

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @login_required
        @wraps(view)
        def wrapped(request: HttpRequest, org_slug: str, *args, **kwargs) -> HttpResponse:
            membership = membership_get(user=request.user, org_slug=org_slug, roles=roles)
            request.membership = membership
            request.org = membership.organization
            if request.session.get(LAST_ORG_SESSION_KEY) != org_slug:  # write only on a switch
                request.session[LAST_ORG_SESSION_KEY] = org_slug
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


def can(request: HttpRequest, roles: Collection[str]) -> bool:
    """For templates and views: whether the current member's role is among `roles`."""
    membership = getattr(request, "membership", None)
    return membership is not None and membership.role in roles
