"""The periodic jobs on the books: stale holds and low-balance alerts."""

from __future__ import annotations

from datetime import timedelta

from django.core import mail
from django.utils import timezone

from apps.billing.models import Account, Hold, HoldStatus
from apps.billing.money import parse_usd
from apps.billing.selectors import books_check
from apps.billing.services import account_for_organization, credit_grant
from apps.billing.tasks import release_stale_holds, send_low_balance_alerts
from config.celery import app as celery_app
from tests.billing.holds import hold_of


def _hold(account, request_id: str, amount: int, expires_in: timedelta) -> Hold:
    return hold_of(account, amount, request_id, expires_at=timezone.now() + expires_in)


def test_stale_holds_are_released_without_charging_and_live_ones_are_kept(funded_org):
    account = account_for_organization(organization=funded_org)
    dead = _hold(account, "dead", 3_000, timedelta(seconds=-1))
    alive = _hold(account, "alive", 2_000, timedelta(minutes=5))
    assert release_stale_holds() == 1
    assert release_stale_holds() == 0  # a second run changes nothing
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert (dead.status, alive.status) == (HoldStatus.RELEASED, HoldStatus.OPEN)
    assert dead.closed_at is not None
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (parse_usd("10"), 2_000)
    assert books_check().is_clean


def test_owners_are_alerted_once_below_the_threshold_and_again_only_after_a_top_up(
    funded_org, member
):
    Account.objects.filter(organization=funded_org).update(
        low_balance_threshold_nano=parse_usd("5")
    )
    account = account_for_organization(organization=funded_org)
    assert send_low_balance_alerts() == 0  # $10 is above $5
    _hold(account, "big", parse_usd("6"), timedelta(minutes=5))  # available now $4
    assert send_low_balance_alerts() == 1
    assert send_low_balance_alerts() == 0
    (alert,) = mail.outbox
    assert alert.to == ["owner@example.com"]  # owners only, not the developer member
    assert "$4.00" in alert.body
    assert "$5.00" in alert.subject
    credit_grant(organization=funded_org, amount_nano=parse_usd("20"))
    assert send_low_balance_alerts() == 0  # lifted above: re-armed, nothing sent
    Hold.objects.filter(request_id="big").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert release_stale_holds() == 1
    _hold(account, "bigger", parse_usd("27"), timedelta(minutes=5))
    assert send_low_balance_alerts() == 1
    assert len(mail.outbox) == 2


def test_no_threshold_means_no_alert(funded_org):
    account = account_for_organization(organization=funded_org)
    _hold(account, "all", parse_usd("10"), timedelta(minutes=5))
    assert send_low_balance_alerts() == 0
    assert not mail.outbox


def test_the_schedule_names_only_tasks_that_exist():
    celery_app.loader.import_default_modules()
    for entry in celery_app.conf.beat_schedule.values():
        assert entry["task"] in celery_app.tasks, entry["task"]
