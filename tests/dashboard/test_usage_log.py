"""The request log on the usage page: what a row shows, the filters, paging by cursor,
and nothing of another organization's."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from apps.billing.money import parse_usd
from apps.billing.services import credit_grant
from apps.catalog.services import price_set
from apps.keys.services import key_create
from apps.usage.models import EndReason, UsageRecord
from tests.dashboard.money import login, settled_call, usage_url


def _request_ids(html: str) -> list[str]:
    return re.findall(r'data-label="Request ID"[^>]*><code>([^<]+)</code>', html)


def _log(client, query: str = "") -> str:
    response = client.get(usage_url() + query)
    assert response.status_code == 200
    return response.content.decode()


def test_a_row_shows_time_key_model_tokens_cost_latency_status_and_request_id(
    client, funded_org, owner, api_key, price
):
    record = settled_call(
        funded_org,
        api_key,
        price,
        "chatcmpl-shown",
        at=datetime(2026, 11, 20, 10, 15, 30, tzinfo=UTC),
        latency_ms=1234,
    )
    html = _log(login(client, owner))
    row = html[html.index("<tbody>", html.index("request-log")) : html.index("</tbody>")]
    assert '<time datetime="2026-11-20T10:15:30+00:00">2026-11-20 10:15:30</time>' in row
    assert f"test key <code>{api_key.display}</code>" in row
    assert ">gpt-4o<" in row
    assert '><span>50 <span class="muted">(10 cached)</span></span><' in row
    assert ">100<" in row
    assert f'data-nano="{record.charged_nano}">$0.001113<' in row
    assert ">1234<" in row
    assert ">200<" in row
    assert "<code>chatcmpl-shown</code>" in row


def test_a_row_shows_the_prompt_tokens_written_to_the_cache(client, funded_org, owner, price):
    settled_call(funded_org, None, price, "chatcmpl-written", cache_write_tokens=30)
    row = _log(login(client, owner)).split("request-log", 1)[1]
    assert (
        '><span>50 <span class="muted">(10 cached)</span>'
        ' <span class="muted">(30 written to cache)</span></span><'
    ) in row


def test_an_incomplete_or_failed_call_says_how_it_ended(client, funded_org, owner, price):
    settled_call(funded_org, None, price, "chatcmpl-gone", end_reason=EndReason.CLIENT_GONE)
    settled_call(
        funded_org,
        None,
        price,
        "chatcmpl-502",
        status_code=502,
        end_reason=EndReason.UPSTREAM_ERROR,
        completion_tokens=0,
    )
    html = _log(login(client, owner))
    assert '><span>200 <span class="badge">Client disconnected</span></span><' in html
    assert '><span>502 <span class="badge">Upstream error</span></span><' in html


@pytest.fixture
def mixed(funded_org, api_key, price):
    """Calls over three days, two keys, two statuses; newest last."""
    other_key, _clear = key_create(organization=funded_org, name="other")
    calls = [
        ("chatcmpl-a", api_key, datetime(2026, 11, 18, 9, tzinfo=UTC), 200, EndReason.DONE),
        ("chatcmpl-b", other_key, datetime(2026, 11, 19, 9, tzinfo=UTC), 200, EndReason.DONE),
        (
            "chatcmpl-c",
            other_key,
            datetime(2026, 11, 19, 23, 59, 59, tzinfo=UTC),
            200,
            EndReason.TIMEOUT,
        ),
        ("chatcmpl-d", api_key, datetime(2026, 11, 20, 0, 0, tzinfo=UTC), 429, EndReason.DONE),
    ]
    for request_id, key, at, status, end in calls:
        settled_call(funded_org, key, price, request_id, at=at, status_code=status, end_reason=end)
    return {"test": api_key, "other": other_key}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["chatcmpl-d", "chatcmpl-c", "chatcmpl-b", "chatcmpl-a"]),
        ("?status=ok", ["chatcmpl-b", "chatcmpl-a"]),
        ("?status=incomplete", ["chatcmpl-c"]),
        ("?status=failed", ["chatcmpl-d"]),
        ("?date_from=2026-11-19", ["chatcmpl-d", "chatcmpl-c", "chatcmpl-b"]),
        ("?date_to=2026-11-19", ["chatcmpl-c", "chatcmpl-b", "chatcmpl-a"]),
        ("?date_from=2026-11-19&date_to=2026-11-19", ["chatcmpl-c", "chatcmpl-b"]),
        ("?model=gpt-4o&status=ok&date_from=2026-11-19", ["chatcmpl-b"]),
    ],
)
def test_the_log_filters_by_status_and_date_range(client, owner, mixed, query, expected):
    assert _request_ids(_log(login(client, owner), query)) == expected


def test_the_log_filters_by_key(client, owner, mixed):
    login(client, owner)
    assert _request_ids(_log(client, f"?key={mixed['other'].pk}")) == ["chatcmpl-c", "chatcmpl-b"]
    html = _log(client, f"?key={mixed['test'].pk}")
    assert _request_ids(html) == ["chatcmpl-d", "chatcmpl-a"]
    assert f'<option value="{mixed["test"].pk}" selected>' in html


def test_the_log_filters_by_model(client, funded_org, owner, api_key, price, mixed):
    mini = price_set(model_name="mini", input_nano_per_mtok=1, output_nano_per_mtok=1)
    settled_call(funded_org, api_key, mini, "chatcmpl-mini")
    login(client, owner)
    assert _request_ids(_log(client, "?model=mini")) == ["chatcmpl-mini"]
    assert len(_request_ids(_log(client, "?model=gpt-4o"))) == 4


def test_another_organizations_key_is_not_a_valid_filter(client, owner, outsider, mixed, price):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=parse_usd("10"))
    their_key, _clear = key_create(organization=elsewhere, name="theirs")
    settled_call(elsewhere, their_key, price, "chatcmpl-theirs")
    html = _log(login(client, owner), f"?key={their_key.pk}")
    assert "Select a valid choice" in html
    assert "chatcmpl-theirs" not in html
    assert f'<option value="{their_key.pk}"' not in html
    assert _request_ids(html) == ["chatcmpl-d", "chatcmpl-c", "chatcmpl-b", "chatcmpl-a"]


def test_bad_filters_are_shown_as_errors_and_the_rest_still_apply(client, owner, mixed):
    html = _log(login(client, owner), "?date_from=2026-11-20&date_to=2026-11-19&status=failed")
    assert "The end date is before the start date." in html
    assert _request_ids(html) == ["chatcmpl-d"]  # from Nov 20 on, failed
    html = _log(client, "?date_from=yesterday&status=nonsense")
    assert html.count('class="errorlist"') == 2
    assert len(_request_ids(html)) == 4


def test_the_log_never_shows_another_organizations_calls(
    client, funded_org, owner, outsider, price
):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=parse_usd("10"))
    theirs = settled_call(elsewhere, None, price, "chatcmpl-theirs")
    ours = settled_call(funded_org, None, price, "chatcmpl-ours")
    login(client, owner)
    for query in ("", f"?before={theirs.pk + 1}", f"?after={theirs.pk - 1}", f"?after={ours.pk}"):
        assert "chatcmpl-theirs" not in _log(client, query), query


def test_the_log_pages_by_cursor_forwards_and_back(client, funded_org, owner, price):
    credit_grant(organization=funded_org, amount_nano=parse_usd("100"))
    for i in range(120):
        settled_call(funded_org, None, price, f"chatcmpl-{i:03d}")
    ids = [f"chatcmpl-{i:03d}" for i in range(119, -1, -1)]  # newest first
    login(client, owner)

    first = _log(client, "?status=ok")
    assert _request_ids(first) == ids[:50]
    assert "Newest" not in first.split("Request log pages")[1]
    older = re.search(r'href="(\?[^"]+)" rel="next"', first).group(1)
    assert "status=ok" in older  # the filters ride along
    assert 'rel="prev"' not in first

    second = _log(client, older.replace("&amp;", "&"))
    assert _request_ids(second) == ids[50:100]
    third = _log(
        client, re.search(r'href="(\?[^"]+)" rel="next"', second).group(1).replace("&amp;", "&")
    )
    assert _request_ids(third) == ids[100:]
    assert 'rel="next"' not in third

    back = re.search(r'href="(\?[^"]+)" rel="prev"', third).group(1).replace("&amp;", "&")
    assert _request_ids(_log(client, back)) == ids[50:100]
    top = re.search(r'href="(\?[^"]+)" rel="prev"', _log(client, back)).group(1)
    back_to_first = _log(client, top.replace("&amp;", "&"))
    assert _request_ids(back_to_first) == ids[:50]
    assert 'rel="prev"' not in back_to_first


def test_a_nonsense_cursor_shows_the_newest_page(client, funded_org, owner, price):
    settled_call(funded_org, None, price, "chatcmpl-1")
    assert _request_ids(_log(login(client, owner), "?before=abc")) == ["chatcmpl-1"]
    assert UsageRecord.objects.count() == 1
