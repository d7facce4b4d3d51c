"""Balance, top-ups and usage: every page under the organization it shows."""

from django.urls import path

from apps.dashboard import balance_views, usage_views

urlpatterns = [
    path("o/<slug:org_slug>/balance/", balance_views.balance_view, name="balance"),
    path(
        "o/<slug:org_slug>/balance/redeem",
        balance_views.balance_redeem_view,
        name="balance-redeem",
    ),
    path("o/<slug:org_slug>/balance/topup", balance_views.balance_topup_view, name="balance-topup"),
    path(
        "o/<slug:org_slug>/balance/topup/<str:session_id>/",
        balance_views.balance_topup_return_view,
        name="balance-topup-return",
    ),
    path(
        "o/<slug:org_slug>/balance/topup/<str:session_id>/status",
        balance_views.balance_topup_status_view,
        name="balance-topup-status",
    ),
    path(
        "o/<slug:org_slug>/balance/threshold",
        balance_views.balance_threshold_view,
        name="balance-threshold",
    ),
    path("o/<slug:org_slug>/usage/", usage_views.usage_view, name="usage"),
    path(
        "o/<slug:org_slug>/usage/daily.csv",
        usage_views.usage_daily_csv_view,
        name="usage-daily-csv",
    ),
    path(
        "o/<slug:org_slug>/usage/requests.csv",
        usage_views.usage_requests_csv_view,
        name="usage-requests-csv",
    ),
]
