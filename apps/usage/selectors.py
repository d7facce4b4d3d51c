"""Reads on usage."""

from __future__ import annotations

from django.db.models import F, Q

from apps.billing.models import Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import format_usd
from apps.usage.models import UsageRecord


def usage_ledger_problems() -> tuple[int, list[str]]:
    """Compare each usage record with its ledger transfer, and each charge with its record.

    Returns the number of records checked and what disagrees: a record whose charge is not
    exactly its transfer, a charge transfer no record accounts for, a settled hold without
    its record.
    """
    problems = []
    mismatched = UsageRecord.objects.filter(
        Q(transfer__isnull=True, charged_nano__gt=0)
        | Q(transfer__isnull=False) & ~Q(transfer__amount_nano=F("charged_nano"))
        | Q(transfer__isnull=False) & ~Q(transfer__kind=TransferKind.CHARGE)
    ).select_related("transfer")
    for record in mismatched[:100]:
        ledger = format_usd(record.transfer.amount_nano) if record.transfer else "no transfer"
        problems.append(
            f"usage record {record.request_id} charged {format_usd(record.charged_nano)} "
            f"but the ledger shows {ledger}"
        )
    orphans = Transfer.objects.filter(kind=TransferKind.CHARGE, usage_record__isnull=True)
    for transfer in orphans[:100]:
        problems.append(f"charge transfer #{transfer.pk} has no usage record")
    settled_ids = Hold.objects.filter(status=HoldStatus.SETTLED).values_list("request_id")
    unrecorded = settled_ids.difference(UsageRecord.objects.values_list("request_id"))
    for (request_id,) in unrecorded[:100]:
        problems.append(f"hold {request_id} was settled but has no usage record")
    return UsageRecord.objects.count(), problems
