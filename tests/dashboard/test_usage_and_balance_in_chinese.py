"""简体中文: the balance and usage pages, their messages and the top-up's return page,
rendered for a browser that prefers zh-Hans, carry no English of ours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import Client

from apps.billing.money import parse_usd
from apps.billing.services import (
    account_for_organization,
    credit_grant,
    low_balance_threshold_set,
)
from apps.billing.topups import checkout_create, code_mint
from apps.tenancy.models import Role
from tests.billing.holds import hold_of
from tests.dashboard.money import refresh_daily_rollups, settled_call
from tests.dashboard.people import user_with_role
from tests.dashboard.test_people_i18n import english_words
from tests.fakes.stripe_api import signed_event

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def _chinese(user) -> Client:
    client = Client(HTTP_ACCEPT_LANGUAGE="zh-Hans,zh;q=0.9,en;q=0.5")
    client.force_login(user)
    return client


def _followed(client: Client, url: str, data: dict[str, str]) -> str:
    return client.post(url, data, follow=True).content.decode()


@pytest.fixture
def pages(org, owner, api_key, price, stripe_api) -> dict[str, str]:
    """Every state of every money page that has words of its own, with data that has
    none (a key named in Chinese, a grant with a Chinese memo)."""
    api_key.name = "测试"
    api_key.save(update_fields=["name"])
    credit_grant(organization=org, amount_nano=parse_usd("20"), memo="欢迎")
    for i in range(3):
        settled_call(org, api_key, price, f"chatcmpl-{i}", at=NOW - timedelta(days=i))
    settled_call(
        org, api_key, price, "chatcmpl-gone", at=NOW, end_reason="client_gone", cache_write_tokens=5
    )
    hold_of(account_for_organization(organization=org), parse_usd("1"), "chatcmpl-live")
    with time_machine.travel(NOW, tick=False):
        refresh_daily_rollups(NOW - timedelta(days=40))
    low_balance_threshold_set(organization=org, threshold_nano=parse_usd("50"))
    checkout = checkout_create(
        organization=org,
        amount_nano=parse_usd("10"),
        user=owner,
        success_url="http://testserver/o/acme/balance/topup/{CHECKOUT_SESSION_ID}/",
        cancel_url="http://testserver/o/acme/balance/",
    )
    expired = checkout_create(
        organization=org,
        amount_nano=parse_usd("10"),
        user=owner,
        success_url="http://testserver/o/acme/balance/topup/{CHECKOUT_SESSION_ID}/",
        cancel_url="http://testserver/o/acme/balance/",
    )
    client = _chinese(owner)
    [code] = code_mint(amount_nano=parse_usd("5"), count=1, batch="", created_by=None)
    topup = f"/o/acme/balance/topup/{checkout.session_id}/"
    got = {
        "redeem-ok": _followed(client, "/o/acme/balance/redeem", {"code": code}),
        "redeem-bad": _followed(client, "/o/acme/balance/redeem", {"code": "nope"}),
        "redeem-empty": _followed(client, "/o/acme/balance/redeem", {"code": ""}),
        "threshold-bad": _followed(client, "/o/acme/balance/threshold", {"threshold": "x"}),
        "threshold-zero": _followed(client, "/o/acme/balance/threshold", {"threshold": "0"}),
        "topup-bad": _followed(client, "/o/acme/balance/topup", {"amount": "1"}),
        "topup-waiting": client.get(topup).content.decode(),
        "threshold-off": _followed(client, "/o/acme/balance/threshold", {"threshold": ""}),
        "threshold-on": _followed(client, "/o/acme/balance/threshold", {"threshold": "100"}),
    }
    for event_type, session in (
        ("checkout.session.completed", checkout),
        ("checkout.session.expired", expired),
    ):
        payload, signature = signed_event(
            stripe_api.sessions[session.session_id], event_type=event_type
        )
        Client().post(
            "/stripe/webhook",
            payload,
            content_type="application/json",
            headers={"Stripe-Signature": signature},
        )
    got["topup-paid"] = client.get(topup).content.decode()
    got["topup-expired"] = client.get(topup.replace(checkout.session_id, expired.session_id))
    got["topup-expired"] = got["topup-expired"].content.decode()
    got["balance-viewer"] = (
        _chinese(user_with_role(org, Role.VIEWER)).get("/o/acme/balance/").content.decode()
    )
    for _ in range(60):
        credit_grant(organization=org, amount_nano=1, memo="一")
    got["balance-page-2"] = client.get("/o/acme/balance/?page=2").content.decode()
    with time_machine.travel(NOW, tick=False):
        for name, query in {
            "usage": "",
            "usage-by-key": "?by=key",
            "usage-filter-errors": "?date_from=2026-11-20&date_to=2026-11-01&key=999",
            "usage-nothing": "?model=gpt-4o&status=failed",
            "usage-older": f"?before={10**9}",
        }.items():
            got[name] = client.get("/o/acme/usage/" + query).content.decode()
    return got


def test_the_money_pages_in_chinese_carry_no_english_of_ours(pages):
    assert all('lang="zh-hans"' in html for html in pages.values())
    leftovers = {name: words for name, html in pages.items() if (words := english_words(html))}
    assert leftovers == {}
