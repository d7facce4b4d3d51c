"""The dashboard's billing actions: redeem a code, pay by card, and Stripe's webhook.

Thin, as every view: parse, check the membership through the one chokepoint
(`membership_get`), call one billing service, answer. Issue 6 renders pages around them;
until then they answer JSON, or redirect to Stripe.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from django_ratelimit.core import get_usage

from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.billing.selectors import available_nano_for_organization
from apps.billing.topups import (
    CheckoutUnavailable,
    CodeRedemptionError,
    TopupError,
    WebhookSignatureError,
    checkout_complete_from_event,
    checkout_create,
    code_redeem,
)
from apps.gateway.views import client_ip
from apps.tenancy.models import Role
from apps.tenancy.selectors import membership_get

# Who may put money into an organization.
TOPUP_ROLES = (Role.OWNER, Role.ADMIN)
# Codes carry 80 random bits, so guessing is hopeless anyway; the limits keep it so and
# keep a leaked list of codes from being tried at speed. Every attempt counts.
REDEEM_RATE_PER_USER = "10/h"
REDEEM_RATE_PER_IP = "30/h"


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _redeem_limited_for(request: HttpRequest) -> int | None:
    """Count this attempt against the user's and the address's limits; the seconds until
    the attempts are allowed again if either is spent, else None."""
    waits = []
    for group, key, rate in (
        ("dashboard.redeem.user", "user", REDEEM_RATE_PER_USER),
        ("dashboard.redeem.ip", lambda _group, req: client_ip(req), REDEEM_RATE_PER_IP),
    ):
        usage = get_usage(request, group=group, key=key, rate=rate, increment=True)
        if usage is not None and usage["should_limit"]:
            waits.append(max(usage["time_left"], 1))
    return max(waits) if waits else None


@login_required
@require_POST
def redeem_view(request: HttpRequest) -> HttpResponse:
    """POST `org` (slug) and `code`: credit the organization with the code's amount."""
    wait = _redeem_limited_for(request)
    if wait is not None:
        response = _error(_("too many attempts to redeem a code; try again later"), 429)
        response["Retry-After"] = str(wait)
        return response
    membership = membership_get(
        user=request.user, org_slug=request.POST.get("org", ""), roles=TOPUP_ROLES
    )
    try:
        transfer = code_redeem(
            code=request.POST.get("code", ""),
            organization=membership.organization,
            user=request.user,
        )
    except CodeRedemptionError as exc:
        return _error(str(exc), 400)
    balance = available_nano_for_organization(organization=membership.organization)
    return JsonResponse(
        {"credited_usd": format_usd(transfer.amount_nano), "balance_usd": format_usd(balance)}
    )


@login_required
@require_POST
def checkout_view(request: HttpRequest) -> HttpResponse:
    """POST `org` (slug) and `amount` (USD): 303 to Stripe's page to pay the top-up."""
    membership = membership_get(
        user=request.user, org_slug=request.POST.get("org", ""), roles=TOPUP_ROLES
    )
    try:
        amount_nano = parse_usd(request.POST.get("amount", ""), allow_zero=False)
        checkout = checkout_create(
            organization=membership.organization, amount_nano=amount_nano, user=request.user
        )
    except CheckoutUnavailable as exc:
        return _error(str(exc), 503)
    except (MoneyError, TopupError) as exc:
        return _error(str(exc), 400)
    response = HttpResponseRedirect(checkout.url)
    response.status_code = 303  # the browser follows with a GET, not a second POST
    return response


@csrf_exempt  # Stripe signs the body instead; nothing here acts on a browser's cookies
@require_POST
def stripe_webhook_view(request: HttpRequest) -> HttpResponse:
    """Stripe's webhook: 400 unless Stripe signed it; otherwise 200, credited or not (an
    event we refuse is logged, and no redelivery could change the answer)."""
    try:
        checkout_complete_from_event(request.body, request.headers.get("Stripe-Signature", ""))
    except WebhookSignatureError:
        return _error("invalid signature", 400)
    return JsonResponse({"received": True})
