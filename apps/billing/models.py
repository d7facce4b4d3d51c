"""Accounts, the immutable double-entry ledger, and holds. Amounts are in nano-dollars
(see apps/billing/money.py).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils.translation import gettext_lazy as _

from apps.keys.models import ApiKey
from apps.tenancy.models import Organization


class AccountKind(models.TextChoices):
    CUSTOMER = "customer", _("Customer")
    REVENUE = "revenue", _("Revenue")  # what customers paid for calls
    TOPUP_CLEARING = "topup_clearing", _("Top-up clearing")  # money paid in (Stripe, codes)
    PROMOTIONS = "promotions", _("Promotions")  # credit given away (demo, operator grants)
    ADJUSTMENTS = "adjustments", _("Adjustments")  # operator refunds and corrections


class Account(models.Model):
    """One account of the books: an organization's (kind customer) or a system account.

    Invariants, held by the database where it can:
    - `balance_nano` is the sum of transfers in minus transfers out. Only
      `transfer_post` changes it, with F() arithmetic, in the transaction that inserts the
      transfer (and, for a call's charge, the settlement statement of apps/usage, which
      inserts the transfer in the same statement); reconciliation recomputes it and
      reports any difference.
    - `held_nano` is the cached sum of this account's open holds; only the hold services
      (and that settlement statement) change it, with the row that opens or closes the
      hold.
    - A customer's spendable balance (`balance_nano - held_nano`) never goes below zero;
      system accounts may be negative (top-up clearing is, by the money paid in).
    """

    kind = models.CharField(max_length=20, choices=AccountKind.choices)
    # A system account kind may have several accounts (revenue: see
    # services.REVENUE_SHARDS); a customer account is always shard 0.
    shard = models.PositiveSmallIntegerField(default=0)
    organization = models.OneToOneField(
        Organization, null=True, blank=True, on_delete=models.PROTECT, related_name="account"
    )
    balance_nano = models.BigIntegerField(default=0)
    held_nano = models.BigIntegerField(default=0)
    # Low-balance alert: the owners are emailed once when the available balance falls
    # below the threshold (null: never), and again only after a top-up lifts it above.
    low_balance_threshold_nano = models.BigIntegerField(null=True, blank=True)
    is_low_balance_alerted = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(kind=AccountKind.CUSTOMER, organization__isnull=False)
                | (~Q(kind=AccountKind.CUSTOMER) & Q(organization__isnull=True)),
                name="account_customer_has_org",
            ),
            models.UniqueConstraint(
                fields=["kind", "shard"],
                condition=Q(organization__isnull=True),
                name="one_system_account_per_kind_and_shard",
            ),
            models.CheckConstraint(
                condition=~Q(kind=AccountKind.CUSTOMER) | Q(shard=0),
                name="customer_account_not_sharded",
            ),
            models.CheckConstraint(condition=Q(held_nano__gte=0), name="account_held_not_negative"),
            models.CheckConstraint(
                condition=~Q(kind=AccountKind.CUSTOMER) | Q(balance_nano__gte=F("held_nano")),
                name="customer_spendable_not_negative",
            ),
        ]

    def __str__(self) -> str:
        if self.organization_id:
            return f"{self.organization}"
        return f"[{self.kind} {self.shard}]" if self.shard else f"[{self.kind}]"

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.held_nano


class TransferKind(models.TextChoices):
    CHARGE = "charge", _("API usage")
    TOPUP = "topup", _("Top-up")
    REDEMPTION = "redemption", _("Code redemption")
    GRANT = "grant", _("Credit granted")
    REFUND = "refund", _("Refund")
    CORRECTION = "correction", _("Correction")


class Transfer(models.Model):
    """One immutable movement of `amount_nano` (> 0) from one account to another.

    Rows are only inserted: `save()` refuses an update, `delete()` raises, and a database
    trigger (migration `transfer_immutable`) refuses UPDATE and DELETE from any query. A
    mistake is corrected by a new transfer the other way. `idempotency_key` names the
    business event (`charge:<call id>`, `stripe:<event id>`, `code:<code>`) so a retry of
    the same event inserts nothing.
    """

    from_account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    to_account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    amount_nano = models.BigIntegerField()
    kind = models.CharField(max_length=20, choices=TransferKind.choices)
    idempotency_key = models.CharField(max_length=200, unique=True, null=True, blank=True)
    memo = models.CharField(max_length=500, blank=True)
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount_nano__gt=0), name="transfer_amount_positive"),
            models.CheckConstraint(
                condition=~Q(from_account=F("to_account")), name="transfer_between_two_accounts"
            ),
        ]
        indexes = [models.Index(fields=["api_key", "created_at"], name="transfer_key_time")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} {self.amount_nano} {self.from_account} → {self.to_account}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise ValueError("a transfer is never edited: post a correcting transfer")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("a transfer is never deleted: post a correcting transfer")


class HoldStatus(models.TextChoices):
    OPEN = "open", _("Open")
    SETTLED = "settled", _("Settled")
    RELEASED = "released", _("Released")


class Hold(models.Model):
    """Money reserved for one call before any byte goes upstream.

    Written before the upstream is called, so it is also the durable record of a call in
    flight: an open hold past `expires_at` belongs to a request that died, and the
    release task frees it. `amount_nano` is the worst-case cost (zero for a free model:
    the row still records the call in flight); settlement charges the metered cost and
    closes the hold in the same transaction.
    """

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="holds")
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    request_id = models.CharField(max_length=64)
    amount_nano = models.BigIntegerField()
    status = models.CharField(max_length=10, choices=HoldStatus.choices, default=HoldStatus.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_nano__gte=0), name="hold_amount_not_negative"
            ),
            # Not `unique=True`: see UsageRecord's request_id.
            models.UniqueConstraint(fields=["request_id"], name="hold_request_id_unique"),
        ]
        indexes = [
            models.Index(
                fields=["expires_at"], condition=Q(status="open"), name="hold_open_by_expiry"
            ),
            models.Index(fields=["api_key"], condition=Q(status="open"), name="hold_open_by_key"),
        ]

    def __str__(self) -> str:
        return f"hold {self.request_id} {self.amount_nano} {self.status}"


class ReconciliationReport(models.Model):
    """What one reconciliation run found. Stored, never edited; an unclean report is
    also logged at error level and emailed to the operators."""

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    is_clean = models.BooleanField()
    accounts = models.PositiveIntegerField()
    transfers = models.PositiveIntegerField()
    usage_records = models.PositiveIntegerField(default=0)
    total_nano = models.BigIntegerField()  # the sum over all accounts: zero when clean
    problems = models.JSONField(default=list)

    class Meta:
        get_latest_by = "finished_at"

    def __str__(self) -> str:
        verdict = "clean" if self.is_clean else "PROBLEMS"
        return f"reconciliation {self.finished_at:%Y-%m-%d %H:%M} {verdict}"


class RedemptionCode(models.Model):
    """A prepaid code an operator minted, worth `amount_nano`, redeemable once.

    Only the SHA-256 of the code is kept (like API keys): a leaked database cannot be
    redeemed. `transfer` is the credit it made; its one-to-one uniqueness, with the
    conditional claim in the service, makes a second redemption impossible.
    """

    code_hash = models.CharField(max_length=64, unique=True)
    last_four = models.CharField(max_length=4)
    batch = models.CharField(max_length=100, blank=True)
    amount_nano = models.BigIntegerField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    redeemed_by_organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    redeemed_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    redeemed_at = models.DateTimeField(null=True, blank=True)
    transfer = models.OneToOneField(
        Transfer, null=True, blank=True, on_delete=models.PROTECT, related_name="redemption"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount_nano__gt=0), name="code_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"code …{self.last_four} ({self.batch})"


class CheckoutStatus(models.TextChoices):
    OPEN = "open", _("Open")
    COMPLETED = "completed", _("Paid")
    EXPIRED = "expired", _("Expired")


class StripeCheckout(models.Model):
    """A Stripe Checkout session created for a top-up. The webhook credits it once: the
    transfer's idempotency key is the session id, whatever the number of deliveries."""

    session_id = models.CharField(max_length=255, unique=True)
    # Stripe's hosted payment page for the session: where the customer is sent, and where
    # the dashboard can send them back while the session is open (it lives 24 hours).
    url = models.URLField(max_length=2000, blank=True)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    amount_nano = models.BigIntegerField()
    currency = models.CharField(max_length=3, default="usd")
    status = models.CharField(
        max_length=10, choices=CheckoutStatus.choices, default=CheckoutStatus.OPEN
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    transfer = models.OneToOneField(
        Transfer, null=True, blank=True, on_delete=models.PROTECT, related_name="checkout"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount_nano__gt=0), name="checkout_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"checkout {self.session_id} {self.status}"
