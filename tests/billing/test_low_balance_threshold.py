"""Setting the low-balance threshold: what it accepts, and how it re-arms the alert."""

from __future__ import annotations

import pytest
from django.core import mail

from apps.billing.models import Account
from apps.billing.money import parse_usd
from apps.billing.services import (
    ThresholdError,
    account_for_organization,
    low_balance_threshold_set,
)
from apps.billing.tasks import send_low_balance_alerts
from tests.billing.holds import hold_of


def _spend_down_to(org, available: str) -> None:
    account = account_for_organization(organization=org)
    hold_of(account, account.available_nano - parse_usd(available), "spend")


def test_a_threshold_is_set_and_cleared(org):
    account = low_balance_threshold_set(organization=org, threshold_nano=parse_usd("5.00"))
    assert account.low_balance_threshold_nano == parse_usd("5.00")
    assert Account.objects.get(organization=org).low_balance_threshold_nano == parse_usd("5")
    low_balance_threshold_set(organization=org, threshold_nano=None)
    assert Account.objects.get(organization=org).low_balance_threshold_nano is None


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        (0, "more than zero"),
        (-1, "more than zero"),
        (parse_usd("5.001"), "whole number of cents"),
        (parse_usd("1000000.01"), "at most \\$1000000.00"),
    ],
)
def test_a_threshold_that_makes_no_sense_is_refused(org, threshold, message):
    with pytest.raises(ThresholdError, match=message):
        low_balance_threshold_set(organization=org, threshold_nano=threshold)
    assert not Account.objects.filter(low_balance_threshold_nano__isnull=False).exists()


def test_a_new_threshold_re_arms_the_alert_and_the_same_one_does_not(funded_org):
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("5"))
    _spend_down_to(funded_org, "4.00")
    assert send_low_balance_alerts() == 1
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("5"))
    assert send_low_balance_alerts() == 0  # the same threshold again: no second email
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("4.50"))
    assert send_low_balance_alerts() == 1  # judged afresh against the new threshold
    assert "$4.50" in mail.outbox[-1].subject


def test_clearing_and_setting_again_warns_again(funded_org):
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("5"))
    _spend_down_to(funded_org, "1.00")
    assert send_low_balance_alerts() == 1
    low_balance_threshold_set(organization=funded_org, threshold_nano=None)
    assert send_low_balance_alerts() == 0
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("5"))
    assert send_low_balance_alerts() == 1
    assert len(mail.outbox) == 2
