"""One record per API call: what it used, what it cost, and how it ended."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _

from apps.billing.models import Transfer
from apps.catalog.models import Channel, Price
from apps.keys.models import ApiKey
from apps.tenancy.models import Organization


class UsageSource(models.TextChoices):
    UPSTREAM = "upstream", _("Reported by the upstream")
    ESTIMATED = "estimated", _("Counted by real200")


class EndReason(models.TextChoices):
    DONE = "done", _("Completed")
    CLIENT_GONE = "client_gone", _("Client disconnected")
    UPSTREAM_ERROR = "upstream_error", _("Upstream error")
    TIMEOUT = "timeout", _("Timed out")


class UsageRecord(models.Model):
    """A settled call. `request_id` is the `chatcmpl-…` id the customer saw.

    `prompt_tokens` counts every prompt token (OpenAI's meaning); `cached_tokens` is the
    part of it read from a prompt cache and `cache_write_tokens` the part written to one,
    each priced at its own rate. `cost_nano` is the metered cost at `price` (the price
    version in force when the call was made); `charged_nano` is what the ledger `transfer`
    took, equal to the cost unless the balance could not cover an upstream's count beyond
    our hold, in which case the difference was never collected. Created once per call, in
    the settlement transaction.
    """

    request_id = models.CharField(max_length=64)
    # Looked up by organization through `usage_org_time`, whose first column it is.
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    api_key = models.ForeignKey(ApiKey, null=True, on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=100)
    price = models.ForeignKey(Price, on_delete=models.PROTECT, related_name="+")
    channel = models.ForeignKey(
        Channel, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    transfer = models.OneToOneField(
        Transfer, null=True, blank=True, on_delete=models.PROTECT, related_name="usage_record"
    )
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # A default in the database too: while a deploy runs, processes of the release before
    # still settle calls, with statements that do not name this column.
    cache_write_tokens = models.PositiveIntegerField(default=0, db_default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_nano = models.BigIntegerField(default=0)
    charged_nano = models.BigIntegerField(default=0)
    usage_source = models.CharField(max_length=10, choices=UsageSource.choices)
    end_reason = models.CharField(max_length=20, choices=EndReason.choices)
    status_code = models.PositiveSmallIntegerField()
    is_stream = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(charged_nano__gte=0)
                & models.Q(charged_nano__lte=models.F("cost_nano")),
                name="usage_charged_within_cost",
            ),
            # A constraint, not `unique=True`, which on PostgreSQL adds a second index for
            # LIKE queries that nothing makes: one index less to write on every call.
            models.UniqueConstraint(fields=["request_id"], name="usage_request_id_unique"),
        ]
        indexes = [models.Index(fields=["organization", "-created_at"], name="usage_org_time")]

    def __str__(self) -> str:
        return self.request_id


class RollupPeriod(models.TextChoices):
    HOUR = "hour", _("Hour")
    DAY = "day", _("Day")


class UsageRollup(models.Model):
    """Usage summed per organization, key and model over one hour or one day (UTC), for
    the dashboard's charts and exports. Derived data: the rollup task recomputes a whole
    bucket from the usage records and overwrites it, so running it twice is harmless."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=100)
    period = models.CharField(max_length=4, choices=RollupPeriod.choices)
    period_start = models.DateTimeField()
    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_nano = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "api_key", "model", "period", "period_start"],
                name="one_rollup_per_bucket",
                nulls_distinct=False,
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "period", "period_start"], name="rollup_org_time"),
        ]

    def __str__(self) -> str:
        return f"{self.organization} {self.model} {self.period} {self.period_start:%Y-%m-%d %H:00}"
