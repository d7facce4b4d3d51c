"""The usage page's charts: spend and tokens per day over the last 30 days, by model and
by key, drawn from the daily rollups; who may see them; and what they cost to draw."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest
import time_machine

from apps.billing.money import parse_usd
from apps.billing.services import credit_grant
from apps.catalog.services import price_set
from apps.dashboard.charts import PALETTE, nice_ceiling, stacked_bar_chart
from apps.keys.services import key_create
from apps.usage.models import RollupPeriod, UsageRollup
from tests.dashboard.money import login, refresh_daily_rollups, settled_call, usage_url
from tests.dashboard.people import ROLES, user_with_role

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
GPT_CALL_NANO = 1_112_500  # 40 input, 10 cached and 100 output tokens at the `price` fixture
MINI_CALL_NANO = 450_000  # 50 input and 100 output tokens at $1 and $4 per million


@pytest.fixture
def traffic(funded_org, api_key, price):
    """Two gpt-4o calls on Nov 18 with the test key; on Nov 20 one gpt-4o and one mini
    call with the "ci" key; and one call 40 days earlier, outside the window."""
    mini = price_set(
        model_name="mini",
        input_nano_per_mtok=parse_usd("1"),
        output_nano_per_mtok=parse_usd("4"),
    )
    ci_key, _clear = key_create(organization=funded_org, name="ci")
    settled_call(funded_org, api_key, price, "chatcmpl-old", at=datetime(2026, 10, 10, tzinfo=UTC))
    for i in range(2):
        settled_call(
            funded_org, api_key, price, f"chatcmpl-18-{i}", at=datetime(2026, 11, 18, 9, tzinfo=UTC)
        )
    at = datetime(2026, 11, 20, 8, tzinfo=UTC)
    settled_call(funded_org, ci_key, price, "chatcmpl-20-gpt", at=at)
    settled_call(funded_org, ci_key, mini, "chatcmpl-20-mini", at=at, cached_tokens=0)
    with time_machine.travel(NOW, tick=False):
        refresh_daily_rollups(datetime(2026, 10, 1, tzinfo=UTC))
    return {"test": api_key, "ci": ci_key}


def _page(client, query: str = "") -> str:
    with time_machine.travel(NOW, tick=False):
        response = client.get(usage_url() + query)
    assert response.status_code == 200
    return response.content.decode()


def _table_rows(html: str, chart: int) -> dict[str, list[str]]:
    """The data table of chart `chart` (1: spend, 2: tokens): its header and each day's
    cells, keyed by the first column."""
    start = html.index(f'id="chart-{chart}-caption"')
    table = html[html.index("<table", start) : html.index("</table>", start)]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        cells = [
            re.sub(r"<[^>]+>", "", c).strip()
            for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        ]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("role", ROLES)
def test_every_member_sees_the_usage_page(client, org, role):
    html = _page(login(client, user_with_role(org, role)))
    assert "The last 30 days" in html
    assert "Request log" in html


def test_an_anonymous_visitor_is_sent_to_log_in(client, org):
    response = client.get(usage_url())
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_the_spend_chart_by_model_sums_the_daily_rollups(client, owner, traffic):
    html = _page(login(client, owner))
    rows = _table_rows(html, 1)
    assert rows["Day (UTC)"] == ["gpt-4o", "mini", "Total"]
    assert rows["2026-11-18"] == ["$0.002225", "$0.00", "$0.002225"]
    assert rows["2026-11-19"] == ["$0.00", "$0.00", "$0.00"]
    assert rows["2026-11-20"] == ["$0.001113", "$0.00045", "$0.001563"]
    assert rows["Total"] == ["$0.003338", "$0.00045", "$0.003788"]
    assert "2026-10-10" not in rows  # outside the 30 days
    assert len(rows) == 1 + 30 + 1  # header, the days from Oct 22 to Nov 20, total
    assert list(rows)[1] == "2026-10-22"
    # The figures above the charts agree to the nano-dollar.
    total = 3 * GPT_CALL_NANO + MINI_CALL_NANO
    assert f'<dd data-nano="{total}">$0.003788</dd>' in html


def test_the_bars_carry_their_values_and_the_chart_describes_itself(client, owner, traffic):
    html = _page(login(client, owner))
    assert "<title>2026-11-18 · gpt-4o: $0.002225</title>" in html
    assert "<title>2026-11-20 · mini: $0.00045</title>" in html
    assert "<title>2026-11-20: $0.001563</title>" in html
    assert "Total $0.003788; the highest day was 2026-11-18 with $0.002225." in html
    assert 'role="img" aria-labelledby="chart-1-title chart-1-desc"' in html
    # The tallest bar reaches the axis top ($0.005: the next 1-2-5 step above $0.002225)
    # in proportion: 2_225_000 / 5_000_000 of 200 units, rounded up.
    assert 'height="89" fill="#0072b2"><title>2026-11-18 · gpt-4o' in html
    assert ">$0.005</text>" in html


def test_the_tokens_chart_counts_input_and_output(client, owner, traffic):
    rows = _table_rows(_page(login(client, owner)), 2)
    assert rows["2026-11-18"] == ["300", "0", "300"]
    assert rows["2026-11-20"] == ["150", "150", "300"]
    assert rows["Total"] == ["450", "150", "600"]


def test_the_charts_by_key_group_by_key(client, owner, traffic):
    html = _page(login(client, owner), "?by=key")
    rows = _table_rows(html, 1)
    test_key, ci_key = traffic["test"], traffic["ci"]
    assert rows["Day (UTC)"] == [
        f"test key ({test_key.display})",
        f"ci ({ci_key.display})",
        "Total",
    ]
    assert rows["2026-11-18"] == ["$0.002225", "$0.00", "$0.002225"]
    assert rows["2026-11-20"] == ["$0.00", "$0.001563", "$0.001563"]
    assert 'href="?by=key" aria-current="true"' in html


def test_an_unknown_grouping_falls_back_to_by_model(client, owner, traffic):
    html = _page(login(client, owner), "?by=nonsense")
    assert _table_rows(html, 1)["Day (UTC)"] == ["gpt-4o", "mini", "Total"]


def test_the_charts_read_the_rollups_not_the_records(client, owner, traffic, funded_org):
    """A rollup is what the chart shows, even before (or without) the records behind it."""
    UsageRollup.objects.create(
        organization=funded_org,
        api_key=None,
        model="gpt-4o",
        period=RollupPeriod.DAY,
        period_start=datetime(2026, 11, 19, tzinfo=UTC),
        requests=1,
        prompt_tokens=1,
        completion_tokens=2,
        cost_nano=parse_usd("1.50"),
    )
    UsageRollup.objects.create(  # hourly rollups are not counted again
        organization=funded_org,
        api_key=None,
        model="gpt-4o",
        period=RollupPeriod.HOUR,
        period_start=datetime(2026, 11, 19, 3, tzinfo=UTC),
        requests=1,
        cost_nano=parse_usd("7.00"),
    )
    rows = _table_rows(_page(login(client, owner)), 1)
    assert rows["2026-11-19"] == ["$1.50", "$0.00", "$1.50"]


def test_the_charts_never_show_another_organizations_usage(client, owner, outsider, price, traffic):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=parse_usd("10"))
    settled_call(elsewhere, None, price, "chatcmpl-theirs", at=datetime(2026, 11, 19, tzinfo=UTC))
    with time_machine.travel(NOW, tick=False):
        refresh_daily_rollups(datetime(2026, 10, 1, tzinfo=UTC))
    rows = _table_rows(_page(login(client, owner)), 1)
    assert rows["2026-11-19"] == ["$0.00", "$0.00", "$0.00"]


def test_an_organization_without_usage_says_so(client, org, owner):
    html = _page(login(client, owner))
    assert html.count("No usage in these 30 days.") == 2
    assert "No requests match." in html


def test_the_page_costs_the_same_queries_however_much_traffic(
    client, funded_org, owner, api_key, price, django_assert_num_queries, settings
):
    settings.CELERY_TASK_ALWAYS_EAGER = False  # a worker refreshes the rollups, not the page
    login(client, owner)
    settled_call(funded_org, api_key, price, "chatcmpl-first")
    refresh_daily_rollups(datetime(2000, 1, 1, tzinfo=UTC))
    client.get(usage_url())  # the session's first write is not what this counts
    # session, user, membership; rollups; keys and models for the filters; the log page
    # (newest, so nothing newer to check); the switcher's memberships
    with django_assert_num_queries(8):
        client.get(usage_url())
    for i in range(80):
        settled_call(funded_org, api_key, price, f"chatcmpl-{i}")
    key_create(organization=funded_org, name="another")
    refresh_daily_rollups(datetime(2000, 1, 1, tzinfo=UTC))
    with django_assert_num_queries(8):
        client.get(usage_url() + "?by=key")
    older = re.search(r'before=(\d+)" rel="next"', client.get(usage_url()).content.decode())
    with django_assert_num_queries(9):  # and whether anything is newer
        client.get(usage_url() + f"?before={older.group(1)}")


def test_without_a_worker_the_page_refreshes_todays_rollups_itself(
    client, funded_org, owner, api_key, price, settings
):
    settings.CELERY_TASK_ALWAYS_EAGER = True  # the embedded default: no worker, no beat
    login(client, owner)
    settled_call(funded_org, api_key, price, "chatcmpl-today")
    page = client.get(usage_url()).content.decode()
    assert UsageRollup.objects.filter(period="day", organization=funded_org).exists()
    assert "gpt-4o" in page


# --- the chart drawing itself ------------------------------------------------------------


def test_the_axis_top_is_the_next_one_two_or_five_step():
    cases = {0: 1, 1: 1, 2: 2, 3: 5, 7: 10, 10: 10, 11: 20, 2_225_000: 5_000_000, 50_001: 100_000}
    assert {value: nice_ceiling(value) for value in cases} == cases


def test_series_past_the_palette_become_one_other_series():
    days = [date(2026, 11, 1), date(2026, 11, 2)]
    series = [(f"m{i}", [10 - i, 1]) for i in range(len(PALETTE) + 2)]
    chart = stacked_bar_chart(title="t", days=days, series=series, fmt=str)
    assert chart.columns == ("m0", "m1", "m2", "m3", "m4", "m5", "Other")
    assert chart.rows[0].cells[-1] == str(10 - 6 + 10 - 7)
    assert chart.rows[1].total == str(len(PALETTE) + 2)
    assert [item.colour for item in chart.legend][-1] == "#8a939d"


def test_any_non_zero_day_is_drawn_at_least_one_unit_tall():
    days = [date(2026, 11, 1), date(2026, 11, 2)]
    chart = stacked_bar_chart(title="t", days=days, series=[("m", [1_000_000, 1])], fmt=str)
    [tall], [small] = (bar.segments for bar in chart.bars)
    assert tall.height == 200
    assert small.height == 1
