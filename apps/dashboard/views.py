"""Stripe's webhook: the one dashboard endpoint that no browser calls.

Thin, as every view: check Stripe's signature and hand the event to the billing service,
which credits a paid top-up once however often Stripe delivers it.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from apps.billing.topups import WebhookSignatureError, checkout_complete_from_event


@csrf_exempt  # Stripe signs the body instead; nothing here acts on a browser's cookies
@require_POST
def stripe_webhook_view(request: HttpRequest) -> HttpResponse:
    """Stripe's webhook: 400 unless Stripe signed it; otherwise 200, credited or not (an
    event we refuse is logged, and no redelivery could change the answer)."""
    try:
        checkout_complete_from_event(request.body, request.headers.get("Stripe-Signature", ""))
    except WebhookSignatureError:
        return JsonResponse({"error": "invalid signature"}, status=400)
    return JsonResponse({"received": True})
