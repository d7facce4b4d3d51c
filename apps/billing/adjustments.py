"""Operators' adjustments of a customer's balance: credits, refunds and corrections.

Each is one ledger transfer, never an edit: a mistake is put right by another adjustment
the other way. The staff user is the transfer's `created_by` and the reason its memo.
"""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from apps.billing.models import AccountKind, Transfer, TransferKind
from apps.billing.money import Nano
from apps.billing.services import (
    account_for_organization,
    system_account,
    transfer_post,
    transfer_post_once,
)
from apps.tenancy.models import Organization, User


class AdjustmentKind(models.TextChoices):
    CREDIT = "credit", gettext_lazy("Credit (goodwill, promotion)")
    REFUND = "refund", gettext_lazy("Refund")
    CORRECTION = "correction", gettext_lazy("Correction")


class Direction(models.TextChoices):
    IN = "in", gettext_lazy("Into the customer's balance")
    OUT = "out", gettext_lazy("Out of the customer's balance")


# Which transfer kind each adjustment is, and the system account on the other side:
# credit given away comes from promotions, refunds and corrections from adjustments.
_LEDGER: dict[str, tuple[TransferKind, AccountKind]] = {
    AdjustmentKind.CREDIT: (TransferKind.GRANT, AccountKind.PROMOTIONS),
    AdjustmentKind.REFUND: (TransferKind.REFUND, AccountKind.ADJUSTMENTS),
    AdjustmentKind.CORRECTION: (TransferKind.CORRECTION, AccountKind.ADJUSTMENTS),
}
REASON_MAX_LENGTH = Transfer._meta.get_field("memo").max_length


class AdjustmentError(ValueError):
    """An adjustment that cannot be made as asked (the message says why)."""


def balance_adjust(
    *,
    organization: Organization,
    amount_nano: Nano,
    direction: str,
    kind: str,
    reason: str,
    staff_user: User,
    idempotency_key: str | None = None,
) -> Transfer:
    """Adjust an organization's balance by `amount_nano`, in `direction` (Direction), as
    a `kind` (AdjustmentKind): one ledger transfer between the customer's account and a
    system account, recording `staff_user` (created_by) and `reason` (the memo).

    Locks: the two accounts, in `transfer_post`'s order. Guarantees: a debit (direction
    out) never takes the customer's spendable balance (balance - open holds) below zero:
    it raises InsufficientFunds and writes nothing. Only active staff may adjust. A retry
    with the same `idempotency_key` (the admin form sends one per rendering, so a double
    submit posts once) returns the first transfer; without one, each call moves money.
    """
    reason = reason.strip()
    if amount_nano <= 0:
        raise AdjustmentError(_("the amount must be more than zero"))
    if direction not in Direction.values:
        raise AdjustmentError(_("the direction must be in or out"))
    if kind not in AdjustmentKind.values:
        raise AdjustmentError(_("the kind must be credit, refund or correction"))
    if not reason:
        raise AdjustmentError(_("a reason is required"))
    if len(reason) > REASON_MAX_LENGTH:
        raise AdjustmentError(
            _("the reason is longer than %(max)d characters") % {"max": REASON_MAX_LENGTH}
        )
    if not (staff_user.is_active and staff_user.is_staff):
        raise AdjustmentError(_("only active staff may adjust a balance"))
    transfer_kind, system_kind = _LEDGER[kind]
    customer = account_for_organization(organization=organization)
    other = system_account(system_kind)
    from_account, to_account = (other, customer) if direction == Direction.IN else (customer, other)
    fields = {
        "from_account": from_account,
        "to_account": to_account,
        "amount_nano": amount_nano,
        "kind": transfer_kind,
        "memo": reason,
        "created_by": staff_user,
    }
    if idempotency_key is None:
        return transfer_post(**fields)
    transfer, _created = transfer_post_once(idempotency_key=idempotency_key, **fields)
    return transfer
