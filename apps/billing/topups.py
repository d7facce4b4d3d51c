"""Top-ups: money paid in, by redemption code or by Stripe Checkout.

Both credit an organization from the top-up clearing account (a system account, negative
by the money paid in), and both credit exactly once by a natural key: the hash of a code
(`code:<hash>`), the id of a Checkout session (`stripe:<session id>`). The first guard is a
conditional UPDATE that claims the code or the session; the unique idempotency key of the
ledger is the second, which holds even if the first were bypassed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import uuid
from datetime import datetime
from typing import Any

import stripe
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from apps.billing.models import (
    AccountKind,
    CheckoutStatus,
    RedemptionCode,
    StripeCheckout,
    Transfer,
    TransferKind,
)
from apps.billing.money import NANO_PER_CENT, MoneyError, Nano, format_usd, parse_usd
from apps.billing.services import account_for_organization, system_account, transfer_post_once
from apps.tenancy.models import Organization, User

logger = logging.getLogger(__name__)

# A code reads R200-XXXX-XXXX-XXXX-XXXX: 16 characters of an alphabet of 32 (5 bits each,
# 80 random bits) with neither 0/O nor 1/I, so a code read aloud or copied by hand cannot
# be mistaken for another.
CODE_PREFIX = "R200"
CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_GROUPS = 4
CODE_GROUP_LENGTH = 4
CODE_MINT_MAX = 10_000  # codes in one batch

STRIPE_TIMEOUT_SECONDS = 20
# Events that credit a paid session: a card is paid when the session completes; a delayed
# method (a bank debit) completes unpaid and is paid later, in async_payment_succeeded.
STRIPE_CREDIT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)


class TopupError(ValueError):
    """A top-up that cannot be made as asked; the message says why, for the customer."""


class CodeRedemptionError(TopupError):
    """A code that cannot be redeemed. Unknown and already used read the same, so the
    message tells nobody whether someone else holds a given code."""


class CheckoutUnavailable(TopupError):
    """Stripe could not open a Checkout session (not configured, unreachable, refused)."""


class WebhookSignatureError(Exception):
    """A webhook request that Stripe did not sign with our secret (or not recently)."""


# --- Redemption codes -----------------------------------------------------------------


def code_hash(code: str) -> str:
    """SHA-256 hex of a code in its canonical form: what the database keeps. A fast hash
    is right here (as for API keys): 80 random bits leave nothing to brute-force."""
    return hashlib.sha256(code.encode()).hexdigest()


def code_canonical(text: str) -> str | None:
    """A code as people type it (any case, spaces, with or without dashes or the prefix)
    in its canonical form `R200-XXXX-XXXX-XXXX-XXXX`; None if it cannot be a code."""
    compact = "".join(text.split()).replace("-", "").upper()
    length = CODE_GROUPS * CODE_GROUP_LENGTH
    # The alphabet has no 0, so the random part can never begin with the prefix.
    if len(compact) == len(CODE_PREFIX) + length and compact.startswith(CODE_PREFIX):
        compact = compact[len(CODE_PREFIX) :]
    if len(compact) != length or any(char not in CODE_ALPHABET for char in compact):
        return None
    groups = [compact[i : i + CODE_GROUP_LENGTH] for i in range(0, length, CODE_GROUP_LENGTH)]
    return "-".join([CODE_PREFIX, *groups])


def _code_generate() -> str:
    return "-".join(
        [
            CODE_PREFIX,
            *(
                "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_GROUP_LENGTH))
                for _ in range(CODE_GROUPS)
            ),
        ]
    )


def code_mint(
    *,
    amount_nano: Nano,
    count: int,
    batch: str,
    created_by: User | None,
    expires_at: datetime | None = None,
) -> list[str]:
    """Mint `count` codes worth `amount_nano` each; returns their clear text, which exists
    nowhere else afterwards: only each code's SHA-256 and last four characters are stored.

    Moves no money: a code is a promise the top-up clearing account honours when it is
    redeemed. All or nothing: one transaction inserts the whole batch. A retry mints a
    second batch.
    """
    batch = batch.strip()
    if amount_nano <= 0:
        raise TopupError(_("a code must be worth more than zero"))
    if not 1 <= count <= CODE_MINT_MAX:
        raise TopupError(_("mint between 1 and %(max)d codes at once") % {"max": CODE_MINT_MAX})
    if len(batch) > RedemptionCode._meta.get_field("batch").max_length:
        raise TopupError(_("the batch name is too long"))
    if expires_at is not None and expires_at <= timezone.now():
        raise TopupError(_("the expiry must be in the future"))
    codes = [_code_generate() for _ in range(count)]
    with transaction.atomic():
        RedemptionCode.objects.bulk_create(
            RedemptionCode(
                code_hash=code_hash(code),
                last_four=code[-4:],
                batch=batch,
                amount_nano=amount_nano,
                created_by=created_by,
                expires_at=expires_at,
            )
            for code in codes
        )
    return codes


def code_redeem(*, code: str, organization: Organization, user: User | None) -> Transfer:
    """Redeem a code into one organization: its amount, from top-up clearing, once.

    Locks: the code's row, by the claim (UPDATE … WHERE redeemed_at IS NULL, checking the
    row count), then the two accounts in `transfer_post`'s order; the claim and the credit
    commit together or not at all. Guarantees: a code credits one organization once,
    however many sessions try it at the same moment: the others wait on the row, find it
    claimed, and get CodeRedemptionError. Unknown, already used and expired codes raise
    CodeRedemptionError and write nothing. A retry after success is refused the same way.
    """
    invalid = CodeRedemptionError(_("this code is invalid or already used"))
    canonical = code_canonical(code)
    if canonical is None:
        raise invalid
    hashed = code_hash(canonical)
    now = timezone.now()
    with transaction.atomic():
        row = RedemptionCode.objects.filter(code_hash=hashed).first()
        if row is None or row.redeemed_at is not None:
            raise invalid
        if row.expires_at is not None and row.expires_at <= now:
            raise CodeRedemptionError(_("this code has expired"))
        claimed = (
            RedemptionCode.objects.filter(pk=row.pk, redeemed_at__isnull=True)
            .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            .update(
                redeemed_at=now,
                redeemed_by_organization=organization,
                redeemed_by_user=user,
            )
        )
        if not claimed:  # another session redeemed it since we read the row
            raise invalid
        transfer, created = transfer_post_once(
            idempotency_key=f"code:{hashed}",
            from_account=system_account(AccountKind.TOPUP_CLEARING),
            to_account=account_for_organization(organization=organization),
            amount_nano=row.amount_nano,
            kind=TransferKind.REDEMPTION,
            memo=f"code …{row.last_four}" + (f" ({row.batch})" if row.batch else ""),
            created_by=user,
        )
        if not created:
            # The ledger already holds this code's credit, yet the row was unclaimed: the
            # books and the codes disagree. Credit nothing and roll the claim back.
            logger.error("code …%s has a ledger credit but was never claimed", row.last_four)
            raise invalid
        RedemptionCode.objects.filter(pk=row.pk).update(transfer=transfer)
    return transfer


# --- Stripe Checkout ------------------------------------------------------------------


def topup_bounds_nano() -> tuple[Nano, Nano]:
    """The smallest and largest card top-up, from TOPUP_MIN_USD and TOPUP_MAX_USD."""
    try:
        low = parse_usd(settings.TOPUP_MIN_USD, allow_zero=False)
        high = parse_usd(settings.TOPUP_MAX_USD, allow_zero=False)
    except MoneyError as exc:
        raise ImproperlyConfigured(f"TOPUP_MIN_USD / TOPUP_MAX_USD: {exc}") from None
    if low > high:
        raise ImproperlyConfigured("TOPUP_MIN_USD is above TOPUP_MAX_USD")
    return low, high


def checkout_cents(amount_nano: Nano) -> int:
    """The amount Stripe charges, in cents; TopupError if it is not whole cents or is
    outside the bounds (the message says the bounds)."""
    low, high = topup_bounds_nano()
    if amount_nano % NANO_PER_CENT:
        raise TopupError(_("a card top-up is a whole number of cents"))
    if amount_nano < low:
        raise TopupError(_("the smallest card top-up is $%(min)s") % {"min": format_usd(low, 2)})
    if amount_nano > high:
        raise TopupError(_("the largest card top-up is $%(max)s") % {"max": format_usd(high, 2)})
    return amount_nano // NANO_PER_CENT


@functools.lru_cache(maxsize=4)
def _stripe_client(secret_key: str, api_base: str) -> stripe.StripeClient:
    """One client per process (it keeps a connection pool) and per configuration; its own
    base address rather than the library's global, so nothing else in the process is
    pointed elsewhere. httpx, unlike the library's default urllib, has a timeout."""
    return stripe.StripeClient(
        secret_key,
        base_addresses={"api": api_base},
        max_network_retries=2,
        http_client=stripe.HTTPXClient(timeout=STRIPE_TIMEOUT_SECONDS, allow_sync_methods=True),
    )


def card_topups_available() -> bool:
    """Whether card top-ups are turned on (STRIPE_SECRET_KEY is set)."""
    return bool(settings.STRIPE_SECRET_KEY)


def checkout_create(
    *,
    organization: Organization,
    amount_nano: Nano,
    user: User | None,
    success_url: str,
    cancel_url: str,
) -> StripeCheckout:
    """Open a Stripe Checkout session for a card top-up of `amount_nano`; the customer pays
    on Stripe's page at `checkout.url`, and Stripe sends them back to `success_url` (where
    `{CHECKOUT_SESSION_ID}` is replaced by the session's id) or `cancel_url`: absolute
    addresses, chosen by the caller, which knows where its pages are.

    Moves no money: only the webhook credits (`checkout_complete_from_event`), once Stripe
    says the session is paid. The row is written before Stripe is asked, so its id can go
    into the session's metadata, and removed if Stripe refuses (no session exists to pay).
    Stripe's idempotency key makes the library's own network retries safe; calling this
    twice opens two sessions, and each credits only what is paid on it. Raises TopupError
    for a bad amount and CheckoutUnavailable when Stripe cannot be used.
    """
    cents = checkout_cents(amount_nano)
    if not card_topups_available():
        raise CheckoutUnavailable(_("card top-ups are not available"))
    client = _stripe_client(settings.STRIPE_SECRET_KEY, settings.STRIPE_API_BASE)
    checkout = StripeCheckout.objects.create(
        session_id=f"pending:{uuid.uuid4().hex}",
        organization=organization,
        amount_nano=amount_nano,
        currency="usd",
        created_by=user,
    )
    metadata = {"organization_id": str(organization.pk), "checkout_id": str(checkout.pk)}
    try:
        session = client.v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": cents,
                            "product_data": {"name": f"real200 balance top-up ({organization})"},
                        },
                    }
                ],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "client_reference_id": str(checkout.pk),
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
            },
            options={"idempotency_key": f"real200-checkout-{uuid.uuid4()}"},
        )
    except stripe.StripeError as exc:
        StripeCheckout.objects.filter(pk=checkout.pk).delete()
        logger.error("Stripe opened no Checkout session for %s: %s", organization, exc)
        raise CheckoutUnavailable(
            _("the payment provider did not answer; please try again in a minute")
        ) from exc
    checkout.session_id, checkout.url = session.id, session.url or ""
    StripeCheckout.objects.filter(pk=checkout.pk).update(
        session_id=checkout.session_id, url=checkout.url
    )
    return checkout


def checkout_complete_from_event(payload: bytes, signature: str) -> StripeCheckout | None:
    """Handle one delivery of Stripe's webhook: credit a paid Checkout session, once.

    The signature is verified first (WebhookSignatureError, nothing read or written).
    `checkout.session.completed` and `…async_payment_succeeded` credit, and only when the
    session is paid and its amount, currency and metadata are those of the StripeCheckout
    we stored; anything else that claims to be ours is refused loudly (logged at error
    level, nothing written) and None is returned, as for events we do not handle: Stripe is
    answered 200, since no redelivery can fix them. `checkout.session.expired` marks an
    open checkout expired.

    Locks: the checkout's row, by the claim (UPDATE … WHERE status <> 'completed'), then
    the two accounts in `transfer_post`'s order. Guarantees: one credit per session,
    whatever the number, order or concurrency of deliveries: the claim admits one
    transaction, and the ledger's unique key `stripe:<session id>` would refuse a second
    credit even past it. A redelivery returns the completed checkout and changes nothing.
    """
    try:
        event = stripe.Webhook.construct_event(
            payload, signature, settings.STRIPE_WEBHOOK_SECRET
        ).to_dict()
    except (stripe.SignatureVerificationError, ValueError) as exc:
        if not settings.STRIPE_WEBHOOK_SECRET:
            logger.error("a Stripe webhook arrived but STRIPE_WEBHOOK_SECRET is not set")
        raise WebhookSignatureError(str(exc)) from None
    event_type = event.get("type")
    session = _mapping(_mapping(event.get("data")).get("object"))
    session_id = session.get("id")
    if event_type == "checkout.session.expired":
        return _checkout_expire(session_id)
    if event_type not in STRIPE_CREDIT_EVENTS:
        return None
    checkout = (
        StripeCheckout.objects.filter(session_id=session_id).first()
        if isinstance(session_id, str)
        else None
    )
    if checkout is None:
        logger.error("Stripe event %s: no checkout of ours has session %r", event_type, session_id)
        return None
    if session.get("payment_status") != "paid":
        logger.info("Stripe session %s completed but not paid yet", session_id)
        return None
    mismatches = _session_mismatches(checkout, session)
    if mismatches:
        logger.error(
            "Stripe session %s refused, nothing credited: %s", session_id, "; ".join(mismatches)
        )
        return None
    return _checkout_credit(checkout)


def _mapping(value: object) -> dict[str, Any]:
    """A JSON object of the event, or an empty one for anything else: a signed event is
    Stripe's, but its shape is still checked rather than trusted."""
    return value if isinstance(value, dict) else {}


def _session_mismatches(checkout: StripeCheckout, session: dict[str, Any]) -> list[str]:
    """How Stripe's session differs from the checkout we asked for (empty: it matches)."""
    metadata = _mapping(session.get("metadata"))
    expected = {
        "mode": ("payment", session.get("mode")),
        "amount_total": (checkout.amount_nano // NANO_PER_CENT, session.get("amount_total")),
        "currency": (checkout.currency, session.get("currency")),
        "metadata.checkout_id": (str(checkout.pk), metadata.get("checkout_id")),
        "metadata.organization_id": (
            str(checkout.organization_id),
            metadata.get("organization_id"),
        ),
    }
    return [
        f"{name} is {got!r}, expected {want!r}"
        for name, (want, got) in expected.items()
        # bool is an int: True must not pass for an amount of one cent.
        if got != want or type(got) is not type(want)
    ]


def _checkout_credit(checkout: StripeCheckout) -> StripeCheckout:
    with transaction.atomic():
        claimed = (
            StripeCheckout.objects.filter(pk=checkout.pk)
            .exclude(status=CheckoutStatus.COMPLETED)
            .update(status=CheckoutStatus.COMPLETED, completed_at=timezone.now())
        )
        if claimed:
            transfer, _created = transfer_post_once(
                idempotency_key=f"stripe:{checkout.session_id}",
                from_account=system_account(AccountKind.TOPUP_CLEARING),
                to_account=account_for_organization(organization=checkout.organization),
                amount_nano=checkout.amount_nano,
                kind=TransferKind.TOPUP,
                memo=f"Stripe Checkout {checkout.session_id}",
                created_by=checkout.created_by,
            )
            StripeCheckout.objects.filter(pk=checkout.pk).update(transfer=transfer)
    checkout.refresh_from_db()
    return checkout


def _checkout_expire(session_id: object) -> StripeCheckout | None:
    if not isinstance(session_id, str):
        return None
    StripeCheckout.objects.filter(session_id=session_id, status=CheckoutStatus.OPEN).update(
        status=CheckoutStatus.EXPIRED
    )
    return StripeCheckout.objects.filter(session_id=session_id).first()
