"""The balance page: what the organization has, what is held for calls in flight, and
where the money went; and the ways to put money in (a code, a card) and the low-balance
warning.

Every view goes through `org_view`: an outsider gets 404, and only the roles in
CAN_TOP_UP may change anything. The forms post to their own URL, which answers with a
message and a redirect back to the balance (or to Stripe), so a reload never re-posts.
"""

from __future__ import annotations

from urllib.parse import unquote

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from apps.billing.models import CheckoutStatus, StripeCheckout
from apps.billing.money import format_usd
from apps.billing.selectors import (
    available_nano_for_organization,
    balance_summary_for_organization,
    checkout_for_organization,
    holds_open_for_organization,
    ledger_balances_after,
    ledger_for_organization,
)
from apps.billing.services import ThresholdError, low_balance_threshold_set
from apps.billing.topups import (
    TopupError,
    card_topups_available,
    checkout_create,
    code_redeem,
    topup_bounds_nano,
)
from apps.dashboard import throttle
from apps.dashboard.access import CAN_TOP_UP, org_view
from apps.dashboard.forms_money import RedeemForm, ThresholdForm, TopUpForm
from apps.dashboard.templatetags.money import usd

LEDGER_PAGE_SIZE = 50
HOLDS_SHOWN = 20
# Codes carry 80 random bits, so guessing is hopeless anyway; the limits keep it so and
# keep a leaked list of codes from being tried at speed. Every attempt counts, per user
# (by email address) and per client address.
REDEEM_LIMITS = throttle.Limits(group="dashboard.redeem", per_ip="30/h", per_email="10/h")
# Stripe puts the session's id in place of this in the address it sends the customer to.
STRIPE_SESSION_PLACEHOLDER = "{CHECKOUT_SESSION_ID}"


@org_view()
@require_GET
def balance_view(request: HttpRequest) -> HttpResponse:
    org = request.org
    summary = balance_summary_for_organization(organization=org)
    page = Paginator(ledger_for_organization(organization=org), LEDGER_PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    transfers = list(page.object_list)
    balances = ledger_balances_after(organization=org, transfers=transfers)
    holds = list(holds_open_for_organization(organization=org)[: HOLDS_SHOWN + 1])
    low, high = topup_bounds_nano()
    threshold = summary.threshold_nano
    return render(
        request,
        "dashboard/balance/balance.html",
        {
            "summary": summary,
            "page": page,
            "entries": list(zip(transfers, balances, strict=True)),
            "holds": holds[:HOLDS_SHOWN],
            "more_holds": len(holds) > HOLDS_SHOWN,
            "redeem_form": RedeemForm(),
            "topup_form": TopUpForm(),
            "threshold_form": ThresholdForm(
                # Whole cents (the service refuses finer), so two places are exact.
                initial={"threshold": format_usd(threshold, 2) if threshold else ""}
            ),
            "card_topups": card_topups_available(),
            "topup_min_nano": low,
            "topup_max_nano": high,
        },
    )


def _back_to_balance(request: HttpRequest) -> HttpResponse:
    return redirect("balance", org_slug=request.org.slug)


@org_view(CAN_TOP_UP)
@require_POST
def balance_redeem_view(request: HttpRequest) -> HttpResponse:
    """Redeem a code into the organization: its amount, once (see `code_redeem`)."""
    wait = throttle.attempt_wait(request, limits=REDEEM_LIMITS, email=request.user.email)
    if wait is not None:
        return throttle.too_many_attempts(request, wait=wait)
    form = RedeemForm(request.POST)
    if not form.is_valid():
        messages.error(request, form.errors["code"][0])
        return _back_to_balance(request)
    try:
        transfer = code_redeem(
            code=form.cleaned_data["code"], organization=request.org, user=request.user
        )
    except TopupError as exc:
        messages.error(request, str(exc))
        return _back_to_balance(request)
    messages.success(
        request,
        _("Code redeemed: %(amount)s was added to the balance.")
        % {"amount": usd(transfer.amount_nano)},
    )
    return _back_to_balance(request)


@org_view(CAN_TOP_UP)
@require_POST
def balance_topup_view(request: HttpRequest) -> HttpResponse:
    """Open a Stripe Checkout session for a card top-up and send the browser to it (303:
    it follows with a GET, not a second POST). Stripe brings the customer back to the
    top-up's own page, which waits for the webhook's credit."""
    form = TopUpForm(request.POST)
    if not form.is_valid():
        messages.error(request, form.errors["amount"][0])
        return _back_to_balance(request)
    slug = request.org.slug
    return_path = reverse(
        "balance-topup-return",
        kwargs={"org_slug": slug, "session_id": STRIPE_SESSION_PLACEHOLDER},
    )
    try:
        checkout = checkout_create(
            organization=request.org,
            amount_nano=form.cleaned_data["amount"],
            user=request.user,
            # The address escapes the placeholder's braces; Stripe wants them as they are
            # (nothing else in it is escaped: a slug and a host are plain ASCII).
            success_url=unquote(request.build_absolute_uri(return_path)),
            cancel_url=request.build_absolute_uri(reverse("balance", kwargs={"org_slug": slug})),
        )
    except TopupError as exc:
        messages.error(request, str(exc))
        return _back_to_balance(request)
    return HttpResponseRedirect(checkout.url, status=303)


def _checkout_or_404(request: HttpRequest, session_id: str) -> StripeCheckout:
    checkout = checkout_for_organization(organization=request.org, session_id=session_id)
    if checkout is None:
        raise Http404("no such top-up")
    return checkout


# How the return page words each state of a checkout.
_TOPUP_STATES = {
    CheckoutStatus.OPEN: "waiting",
    CheckoutStatus.COMPLETED: "paid",
    CheckoutStatus.EXPIRED: "expired",
}


def _topup_state(request: HttpRequest, checkout: StripeCheckout) -> dict:
    return {
        "checkout": checkout,
        "state": _TOPUP_STATES[checkout.status],
        "available_nano": available_nano_for_organization(organization=request.org),
    }


@never_cache
@org_view()
@require_GET
def balance_topup_return_view(request: HttpRequest, session_id: str) -> HttpResponse:
    """Where Stripe sends the customer after paying: the top-up's state, which updates in
    place until the webhook has credited it."""
    checkout = _checkout_or_404(request, session_id)
    return render(request, "dashboard/balance/topup_status.html", _topup_state(request, checkout))


@never_cache
@org_view()
@require_GET
def balance_topup_status_view(request: HttpRequest, session_id: str) -> HttpResponse:
    """The top-up's state alone, as an HTML fragment, for the return page to poll."""
    checkout = _checkout_or_404(request, session_id)
    return render(
        request, "dashboard/balance/partials/_topup_status.html", _topup_state(request, checkout)
    )


@org_view(CAN_TOP_UP)
@require_POST
def balance_threshold_view(request: HttpRequest) -> HttpResponse:
    """Set or clear the low-balance warning."""
    form = ThresholdForm(request.POST)
    if not form.is_valid():
        messages.error(request, form.errors["threshold"][0])
        return _back_to_balance(request)
    threshold = form.cleaned_data["threshold"]
    try:
        low_balance_threshold_set(organization=request.org, threshold_nano=threshold)
    except ThresholdError as exc:
        messages.error(request, str(exc))
        return _back_to_balance(request)
    if threshold is None:
        messages.success(request, _("The low-balance warning is off."))
    else:
        messages.success(
            request,
            _("The owners will be emailed when the available balance falls below %(amount)s.")
            % {"amount": usd(threshold)},
        )
    return _back_to_balance(request)
