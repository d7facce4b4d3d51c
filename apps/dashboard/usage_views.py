"""The usage page: spend and tokens per day over the last 30 days, from the daily
rollups, and the request log with its filters; and both as CSV.

Every member of the organization may look. Each page costs a fixed number of queries
whatever the traffic: the charts read the daily rollups in one query, and the log pages
by cursor (see `usage_log_page`).
"""

from __future__ import annotations

from datetime import UTC, date, timedelta

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET

from apps.dashboard.access import org_view
from apps.dashboard.charts import stacked_bar_chart
from apps.dashboard.exports import daily_csv_response, requests_csv_response
from apps.dashboard.forms_money import UsageFilterForm
from apps.dashboard.templatetags.money import usd_price
from apps.usage.selectors import (
    UsageGrouping,
    usage_daily,
    usage_daily_rollups,
    usage_keys_for_organization,
    usage_log_page,
    usage_model_names,
    usage_records_for_organization,
    usage_window,
)
from apps.usage.tasks import rollup_usage

CHART_DAYS = 30


def _today() -> date:
    return timezone.now().astimezone(UTC).date()


def _tokens(count: int) -> str:
    return f"{count:,}"


def _cursor(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _grouping(text: str | None) -> UsageGrouping:
    return UsageGrouping(text) if text in UsageGrouping.values else UsageGrouping.MODEL


def _filter_form(request: HttpRequest) -> UsageFilterForm:
    return UsageFilterForm(
        request.GET,
        keys=usage_keys_for_organization(organization=request.org),
        models=usage_model_names(),
    )


@org_view()
@require_GET
def usage_view(request: HttpRequest) -> HttpResponse:
    org = request.org
    if settings.CELERY_TASK_ALWAYS_EAGER:
        # The embedded default has no worker and no beat: refresh the recent rollups here,
        # in-process, so the charts of `make run` show today's calls.
        rollup_usage.delay(hours=2)
    by = _grouping(request.GET.get("by"))
    daily = usage_daily(organization=org, today=_today(), days=CHART_DAYS, by=by)
    form = _filter_form(request)
    log = usage_log_page(
        organization=org,
        filters=form.filters(),
        before=_cursor(request.GET.get("before")),
        after=_cursor(request.GET.get("after")),
    )
    return render(
        request,
        "dashboard/usage/usage.html",
        {
            "by": by,
            "groupings": UsageGrouping.choices,
            "daily": daily,
            "charts": [
                stacked_bar_chart(
                    title=_("Spend per day (USD)"),
                    days=daily.days,
                    series=[(group.label, group.cost_nano) for group in daily.groups],
                    fmt=usd_price,
                ),
                stacked_bar_chart(
                    title=_("Tokens per day"),
                    days=daily.days,
                    series=[(group.label, group.tokens) for group in daily.groups],
                    fmt=_tokens,
                ),
            ],
            "form": form,
            "log": log,
            "is_first_page": request.GET.get("before") is None and request.GET.get("after") is None,
        },
    )


@org_view()
@require_GET
def usage_daily_csv_view(request: HttpRequest) -> HttpResponse:
    """The rollup rows behind the charts: one per day, model and key, last 30 days."""
    since, until = usage_window(today=_today(), days=CHART_DAYS)
    last_day = (until - timedelta(days=1)).date()
    return daily_csv_response(
        filename=f"real200-usage-daily-{request.org.slug}-{since.date()}-{last_day}.csv",
        rollups=usage_daily_rollups(organization=request.org, since=since, until=until),
    )


@org_view()
@require_GET
def usage_requests_csv_view(request: HttpRequest) -> HttpResponse:
    """The request log with the page's filters, every matching call, newest first."""
    records = usage_records_for_organization(
        organization=request.org, filters=_filter_form(request).filters()
    )
    return requests_csv_response(
        filename=f"real200-requests-{request.org.slug}-{_today()}.csv", records=records
    )
