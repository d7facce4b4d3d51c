"""Organizations and their members: create, invite, accept, change roles, remove.

Every page under `/o/<org_slug>/` passes `org_view` (the membership check) first, so an
outsider gets 404 before anything else is looked at; members and invitations are then
fetched only within `request.org`.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods, require_POST

from apps.dashboard.access import ANY_ROLE, CAN_MANAGE_MEMBERS, can, org_view
from apps.dashboard.forms import InvitationForm, MemberRoleForm, OrganizationForm
from apps.tenancy.models import Role
from apps.tenancy.selectors import (
    invitation_get_in_org,
    invitation_get_open_by_token,
    invitation_list_pending,
    membership_get_in_org,
    membership_list_for_org,
)
from apps.tenancy.services import (
    TenancyError,
    invitation_accept,
    invitation_cancel,
    invitation_create,
    membership_remove,
    membership_set_role,
    organization_create,
)


@login_required
@require_http_methods(["GET", "POST"])
def org_create_view(request: HttpRequest) -> HttpResponse:
    form = OrganizationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            org = organization_create(
                slug=form.cleaned_data["slug"] or None,
                name=form.cleaned_data["name"],
                owner=request.user,
            )
        except TenancyError as error:
            form.add_error("slug", str(error))
        else:
            messages.success(request, _("Organization %(name)s created.") % {"name": org.name})
            return redirect("keys-list", org_slug=org.slug)
    return render(request, "dashboard/orgs/create.html", {"form": form})


@org_view(ANY_ROLE)
@require_http_methods(["GET"])
def members_view(request: HttpRequest) -> HttpResponse:
    """Everyone may see who belongs; only managers see the pending invitations and the
    controls."""
    managing = can(request, CAN_MANAGE_MEMBERS)
    return render(
        request,
        "dashboard/orgs/members.html",
        {
            "memberships": membership_list_for_org(organization=request.org),
            "invitations": invitation_list_pending(organization=request.org) if managing else [],
            "roles": Role.choices,
        },
    )


@org_view(CAN_MANAGE_MEMBERS)
@require_http_methods(["GET", "POST"])
def member_invite_view(request: HttpRequest) -> HttpResponse:
    """Invite by email; the answer shows the one-time link (also emailed), never again."""
    form = InvitationForm(request.POST or None)

    def link(token: str) -> str:
        return request.build_absolute_uri(reverse("invitation-accept", kwargs={"token": token}))

    if request.method == "POST" and form.is_valid():
        try:
            invitation, token = invitation_create(
                actor=request.membership,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                accept_url=link,
            )
        except TenancyError as error:
            form.add_error(None, str(error))
        else:
            response = render(
                request,
                "dashboard/orgs/invitation_created.html",
                {"invitation": invitation, "link": link(token)},
            )
            response["Cache-Control"] = "no-store"
            return response
    return render(request, "dashboard/orgs/invite.html", {"form": form})


@org_view(CAN_MANAGE_MEMBERS)
@require_POST
def member_role_view(request: HttpRequest, pk: int) -> HttpResponse:
    membership = membership_get_in_org(organization=request.org, membership_id=pk)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Choose a role."))
        return redirect("members", org_slug=request.org.slug)
    try:
        membership = membership_set_role(
            actor=request.membership, membership=membership, role=form.cleaned_data["role"]
        )
    except TenancyError as error:
        messages.error(request, str(error))
    else:
        messages.success(
            request,
            _("%(email)s is now %(role)s.")
            % {"email": membership.user.email, "role": membership.get_role_display()},
        )
    return redirect("members", org_slug=request.org.slug)


@org_view(CAN_MANAGE_MEMBERS)
@require_http_methods(["GET", "POST"])
def member_remove_view(request: HttpRequest, pk: int) -> HttpResponse:
    """GET asks for confirmation; POST removes."""
    membership = membership_get_in_org(organization=request.org, membership_id=pk)
    if request.method == "GET":
        return render(request, "dashboard/orgs/member_remove.html", {"target": membership})
    try:
        membership_remove(actor=request.membership, membership=membership)
    except TenancyError as error:
        messages.error(request, str(error))
        return redirect("members", org_slug=request.org.slug)
    messages.success(request, _("%(email)s was removed.") % {"email": membership.user.email})
    if membership.user_id == request.user.pk:  # they left: this organization is closed to them
        return redirect("dashboard-home")
    return redirect("members", org_slug=request.org.slug)


@org_view(CAN_MANAGE_MEMBERS)
@require_POST
def invitation_cancel_view(request: HttpRequest, pk: int) -> HttpResponse:
    invitation = invitation_get_in_org(organization=request.org, invitation_id=pk)
    invitation_cancel(invitation=invitation)
    messages.success(
        request, _("The invitation to %(email)s was withdrawn.") % {"email": invitation.email}
    )
    return redirect("members", org_slug=request.org.slug)


@require_http_methods(["GET", "POST"])
def invitation_accept_view(request: HttpRequest, token: str) -> HttpResponse:
    """Anyone with the link sees what it offers; a signed-in user with the invited email
    address accepts it with a POST. Others are told to sign in or sign up first."""
    invitation = invitation_get_open_by_token(token=token)
    if invitation is None:
        return render(request, "dashboard/orgs/invitation_invalid.html", status=404)
    context = {"invitation": invitation, "here": request.path}
    if request.method == "POST" and request.user.is_authenticated:
        try:
            membership = invitation_accept(token=token, user=request.user)
        except TenancyError as error:
            context["error"] = str(error)
            return render(request, "dashboard/orgs/invitation.html", context, status=400)
        messages.success(
            request,
            _("You joined %(name)s as %(role)s.")
            % {"name": membership.organization.name, "role": membership.get_role_display()},
        )
        return redirect("keys-list", org_slug=membership.organization.slug)
    response = render(request, "dashboard/orgs/invitation.html", context)
    response["Cache-Control"] = "no-store"
    return response
