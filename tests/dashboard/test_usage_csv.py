"""The CSV exports of the usage page: the daily rollup rows behind the charts, and the
filtered request log, streamed, with money as exact USD strings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse

from apps.billing.money import parse_usd
from apps.billing.services import credit_grant
from apps.catalog.services import price_set
from apps.keys.services import key_create
from apps.usage.models import EndReason
from tests.dashboard.money import login, refresh_daily_rollups, settled_call
from tests.dashboard.people import ROLES, user_with_role

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
DAILY, REQUESTS = "/o/acme/usage/daily.csv", "/o/acme/usage/requests.csv"


def _csv(response) -> str:
    """The body of a streamed export, read as ASGI reads it: asynchronously."""
    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response.is_async  # under ASGI, a synchronous iterator would be read whole first

    async def read() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    body = async_to_sync(read)()
    assert body.startswith(b"\xef\xbb\xbf")  # UTF-8's BOM: Excel then reads it as UTF-8
    return body.decode("utf-8-sig")


@pytest.fixture
def traffic(funded_org, api_key, price):
    mini = price_set(
        model_name="mini", input_nano_per_mtok=parse_usd("1"), output_nano_per_mtok=parse_usd("4")
    )
    ci_key, _clear = key_create(organization=funded_org, name="=HYPERLINK(evil)")
    day18 = datetime(2026, 11, 18, 9, 30, tzinfo=UTC)
    day20 = datetime(2026, 11, 20, 8, 0, 5, tzinfo=UTC)
    settled_call(funded_org, api_key, price, "chatcmpl-old", at=datetime(2026, 10, 1, tzinfo=UTC))
    settled_call(funded_org, api_key, price, "chatcmpl-a", at=day18, latency_ms=300)
    settled_call(
        funded_org, api_key, price, "chatcmpl-b", at=day18, latency_ms=310, cache_write_tokens=5
    )
    settled_call(
        funded_org,
        ci_key,
        mini,
        "chatcmpl-c",
        at=day20,
        cached_tokens=0,
        status_code=502,
        end_reason=EndReason.UPSTREAM_ERROR,
    )
    with time_machine.travel(NOW, tick=False):
        refresh_daily_rollups(datetime(2026, 9, 1, tzinfo=UTC))
    return {"test": api_key, "ci": ci_key}


def test_the_daily_export_is_the_rollup_rows_of_the_last_30_days(client, owner, traffic):
    login(client, owner)
    with time_machine.travel(NOW, tick=False):
        response = client.get(DAILY)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == (
        'attachment; filename="real200-usage-daily-acme-2026-10-22-2026-11-20.csv"'
    )
    test_key, ci_key = traffic["test"].display, traffic["ci"].display
    assert _csv(response) == (
        "date,model,key,key_name,requests,prompt_tokens,cached_tokens,cache_write_tokens,"
        "completion_tokens,cost_usd\r\n"
        f"2026-11-18,gpt-4o,{test_key},test key,2,100,20,5,200,0.002225000\r\n"
        f"2026-11-20,mini,{ci_key},'=HYPERLINK(evil),1,50,0,0,100,0.000450000\r\n"
    )


def test_the_request_export_has_every_matching_call_with_exact_money(client, owner, traffic):
    login(client, owner)
    with time_machine.travel(NOW, tick=False):
        response = client.get(REQUESTS)
    assert response["Content-Disposition"] == (
        'attachment; filename="real200-requests-acme-2026-11-20.csv"'
    )
    test_key, ci_key = traffic["test"].display, traffic["ci"].display
    assert _csv(response) == (
        "time_utc,request_id,key,key_name,model,prompt_tokens,cached_tokens,cache_write_tokens,"
        "completion_tokens,cost_usd,charged_usd,latency_ms,status,end_reason,stream\r\n"
        f"2026-11-20T08:00:05+00:00,chatcmpl-c,{ci_key},'=HYPERLINK(evil),mini,50,0,0,100,"
        "0.000450000,0.000450000,12,502,upstream_error,false\r\n"
        f"2026-11-18T09:30:00+00:00,chatcmpl-b,{test_key},test key,gpt-4o,50,10,5,100,"
        "0.001112500,0.001112500,310,200,done,false\r\n"
        f"2026-11-18T09:30:00+00:00,chatcmpl-a,{test_key},test key,gpt-4o,50,10,0,100,"
        "0.001112500,0.001112500,300,200,done,false\r\n"
        f"2026-10-01T00:00:00+00:00,chatcmpl-old,{test_key},test key,gpt-4o,50,10,0,100,"
        "0.001112500,0.001112500,12,200,done,false\r\n"
    )


def test_the_request_export_takes_the_log_filters(client, owner, traffic):
    login(client, owner)
    query = f"?key={traffic['test'].pk}&date_from=2026-11-01&date_to=2026-11-18&status=ok"
    lines = _csv(client.get(REQUESTS + query)).splitlines()
    assert [line.split(",")[1] for line in lines] == ["request_id", "chatcmpl-b", "chatcmpl-a"]
    lines = _csv(client.get(REQUESTS + "?status=failed&model=mini")).splitlines()
    assert [line.split(",")[1] for line in lines] == ["request_id", "chatcmpl-c"]


def test_the_page_links_the_exports_with_its_filters(client, owner, traffic):
    login(client, owner)
    html = client.get("/o/acme/usage/?status=ok&before=99&by=key").content.decode()
    assert 'href="/o/acme/usage/daily.csv" download' in html
    assert 'href="/o/acme/usage/requests.csv?status=ok" download' in html


def test_the_exports_never_contain_another_organizations_usage(
    client, owner, outsider, price, traffic
):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=parse_usd("10"))
    their_key, _clear = key_create(organization=elsewhere, name="theirs")
    settled_call(elsewhere, their_key, price, "chatcmpl-theirs")
    with time_machine.travel(NOW, tick=False):
        refresh_daily_rollups(datetime(2026, 9, 1, tzinfo=UTC))
    login(client, owner)
    with time_machine.travel(NOW, tick=False):
        daily = _csv(client.get(DAILY))
        requests = _csv(client.get(REQUESTS))
        with_their_key = _csv(client.get(REQUESTS + f"?key={their_key.pk}"))
    for export in (daily, requests, with_their_key):
        assert "theirs" not in export
        assert their_key.display not in export
    assert with_their_key == requests  # an invalid filter narrows nothing


@pytest.mark.parametrize("role", ROLES)
def test_every_member_may_export(client, org, role):
    login(client, user_with_role(org, role))
    assert _csv(client.get(DAILY)).startswith("date,")
    assert _csv(client.get(REQUESTS)).startswith("time_utc,")


def test_an_outsider_gets_404_and_an_anonymous_visitor_the_login(client, org, outsider):
    for url in (DAILY, REQUESTS):
        assert client.get(url).status_code == 302
    login(client, outsider)
    for url in (DAILY, REQUESTS, "/o/no-such-org/usage/daily.csv"):
        assert client.get(url).status_code == 404


def test_a_log_longer_than_one_chunk_is_exported_whole_and_in_order(
    client, funded_org, owner, price, monkeypatch
):
    monkeypatch.setattr("apps.dashboard.exports.CHUNK_ROWS", 7)
    credit_grant(organization=funded_org, amount_nano=parse_usd("100"))
    for i in range(30):
        settled_call(funded_org, None, price, f"chatcmpl-{i:02d}")
    response = login(client, owner).get(REQUESTS)
    lines = _csv(response).splitlines()
    assert len(lines) == 31
    assert lines[1].split(",")[1] == "chatcmpl-29"
    assert lines[-1].split(",")[1] == "chatcmpl-00"
