"""Periodic jobs on the books. Each calls one service and is safe to run twice at once."""

from __future__ import annotations

from celery import shared_task

from apps.billing.services import holds_release_stale, low_balance_alerts_send


@shared_task(time_limit=120, soft_time_limit=100)
def release_stale_holds() -> int:
    return holds_release_stale()


@shared_task(time_limit=120, soft_time_limit=100)
def send_low_balance_alerts() -> int:
    return low_balance_alerts_send()
