"""Operators' view of usage: read-only, as the ledger it explains."""

from __future__ import annotations

from django.contrib import admin
from django.utils.translation import gettext_lazy as _

from apps.billing.admin import ReadOnlyAdmin
from apps.billing.money import format_usd
from apps.usage.models import UsageRecord, UsageRollup


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id",
        "created_at",
        "organization",
        "api_key",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "charged_usd",
        "end_reason",
        "status_code",
    )
    list_filter = ("end_reason", "usage_source", "is_stream")
    list_select_related = ("organization", "api_key")
    search_fields = ("=request_id", "organization__slug", "model")
    date_hierarchy = "created_at"

    @admin.display(description=_("cost, USD"))
    def cost_usd(self, record: UsageRecord) -> str:
        return format_usd(record.cost_nano)

    @admin.display(description=_("charged, USD"))
    def charged_usd(self, record: UsageRecord) -> str:
        return format_usd(record.charged_nano)


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = ("period_start", "period", "organization", "api_key", "model", "requests")
    list_filter = ("period",)
    list_select_related = ("organization", "api_key")
    search_fields = ("organization__slug", "model")
