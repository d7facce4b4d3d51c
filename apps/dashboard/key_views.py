"""API keys, and the pages that help use them: the models with their prices, and the
quick-start.

A key's clear text appears in exactly one response: the one that created it. It is not
put in the session or anywhere else, so no later page can show it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods

from apps.billing.money import Nano
from apps.catalog.selectors import callable_models, price_list_callable
from apps.dashboard.access import ANY_ROLE, CAN_MANAGE_KEYS, org_view
from apps.dashboard.forms import KeyEditForm, KeyPolicyForm
from apps.keys.models import ApiKey
from apps.keys.selectors import key_get_in_org, key_list_for_org
from apps.keys.services import KeyPolicyError, key_create, key_revoke, key_update_policy
from apps.usage.selectors import usage_spend_by_key

# The model the examples call when the key allows every model and none is callable yet.
EXAMPLE_MODEL = "gpt-4o"


@dataclass(frozen=True, slots=True)
class KeyRow:
    key: ApiKey
    status: str  # "active", "revoked" or "expired"
    spent_this_month_nano: Nano


def _examples_context(request: HttpRequest, *, key: ApiKey | None = None) -> dict:
    """What the code examples need: the API's base URL as this visitor reaches it, and a
    model the key may call."""
    if key is not None and key.allowed_models:
        model = key.allowed_models[0]
    else:
        names = [m.name for m in callable_models()]
        model = names[0] if names else EXAMPLE_MODEL
    return {"base_url": request.build_absolute_uri("/v1"), "example_model": model}


@org_view(ANY_ROLE)
@require_http_methods(["GET"])
def keys_list_view(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = usage_spend_by_key(organization=request.org, since=month_start)
    rows = [
        KeyRow(key=key, status=key.status(now), spent_this_month_nano=spent.get(key.pk, 0))
        for key in key_list_for_org(organization=request.org)
    ]
    return render(request, "dashboard/keys/list.html", {"rows": rows})


@org_view(CAN_MANAGE_KEYS)
@require_http_methods(["GET", "POST"])
def key_create_view(request: HttpRequest) -> HttpResponse:
    form = KeyPolicyForm(request.POST or None, model_names=[m.name for m in callable_models()])
    if request.method == "POST" and form.is_valid():
        try:
            key, clear = key_create(
                organization=request.org, created_by=request.user, **form.key_kwargs()
            )
        except KeyPolicyError as error:
            form.add_error(None, str(error))
        else:
            response = render(
                request,
                "dashboard/keys/created.html",
                {"key": key, "clear_key": clear, **_examples_context(request, key=key)},
            )
            # Kept by no cache and no back button: this page is the key's only showing.
            response["Cache-Control"] = "no-store"
            return response
    return render(request, "dashboard/keys/form.html", {"form": form, "key": None})


@org_view(CAN_MANAGE_KEYS)
@require_http_methods(["GET", "POST"])
def key_edit_view(request: HttpRequest, pk: int) -> HttpResponse:
    key = key_get_in_org(organization=request.org, key_id=pk)
    form = KeyEditForm(
        request.POST or None, model_names=[m.name for m in callable_models()], key=key
    )
    if request.method == "POST" and form.is_valid():
        try:
            key_update_policy(key=key, **form.key_kwargs())
        except KeyPolicyError as error:
            form.add_error(None, str(error))
        else:
            messages.success(request, _("Key %(key)s updated.") % {"key": key.display})
            return redirect("keys-list", org_slug=request.org.slug)
    return render(request, "dashboard/keys/form.html", {"form": form, "key": key})


@org_view(CAN_MANAGE_KEYS)
@require_http_methods(["GET", "POST"])
def key_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    """GET asks for confirmation; POST revokes (at once, on every process)."""
    key = key_get_in_org(organization=request.org, key_id=pk)
    if request.method == "GET":
        return render(request, "dashboard/keys/revoke.html", {"key": key})
    key_revoke(key=key)
    messages.success(request, _("Key %(key)s revoked.") % {"key": key.display})
    return redirect("keys-list", org_slug=request.org.slug)


@org_view(ANY_ROLE)
@require_http_methods(["GET"])
def models_list_view(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/models/list.html", {"prices": price_list_callable()})


@org_view(ANY_ROLE)
@require_http_methods(["GET"])
def docs_view(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/docs/quickstart.html", _examples_context(request))
