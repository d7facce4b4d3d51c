"""Reads on usage: the request log, the daily rollups behind the charts, and the check
of usage against the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db import models
from django.db.models import F, Q, QuerySet, Sum
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from apps.billing.models import Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import Nano, format_usd
from apps.catalog.models import LanguageModel
from apps.keys.models import ApiKey
from apps.tenancy.models import Organization
from apps.usage.models import EndReason, RollupPeriod, UsageRecord, UsageRollup

LOG_PAGE_SIZE = 50


class RequestStatus(models.TextChoices):
    """How a call ended, as the request log filters it."""

    SUCCEEDED = "ok", gettext_lazy("Succeeded")
    INCOMPLETE = "incomplete", gettext_lazy("Incomplete (disconnected, cut off, timed out)")
    FAILED = "failed", gettext_lazy("Failed")


_SUCCESS = Q(status_code__gte=200, status_code__lt=300)
_STATUS_FILTERS = {
    RequestStatus.SUCCEEDED: _SUCCESS & Q(end_reason=EndReason.DONE),
    RequestStatus.INCOMPLETE: _SUCCESS & ~Q(end_reason=EndReason.DONE),
    RequestStatus.FAILED: ~_SUCCESS,
}


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """What the request log is narrowed to; empty fields do not narrow."""

    api_key_id: int | None = None
    model: str = ""
    status: str = ""  # a RequestStatus
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


def usage_records_for_organization(
    *, organization: Organization, filters: UsageFilters
) -> QuerySet[UsageRecord]:
    """The organization's usage records matching `filters`, newest first, with their keys.

    Newest first by id: records are inserted when their call settles, so the id follows the
    time, and paging on it needs no second column.
    """
    records = UsageRecord.objects.filter(organization=organization)
    if filters.api_key_id is not None:
        records = records.filter(api_key_id=filters.api_key_id)
    if filters.model:
        records = records.filter(model=filters.model)
    if filters.status:
        records = records.filter(_STATUS_FILTERS[RequestStatus(filters.status)])
    if filters.since is not None:
        records = records.filter(created_at__gte=filters.since)
    if filters.until is not None:
        records = records.filter(created_at__lt=filters.until)
    return records.select_related("api_key").order_by("-pk")


@dataclass(frozen=True, slots=True)
class LogPage:
    """One page of the request log, newest first. `older` and `newer` are the cursors of
    the neighbouring pages (None: there is none): pass `older` as `before`, `newer` as
    `after`."""

    records: list[UsageRecord]
    older: int | None
    newer: int | None


def usage_log_page(
    *,
    organization: Organization,
    filters: UsageFilters,
    before: int | None = None,
    after: int | None = None,
    size: int = LOG_PAGE_SIZE,
) -> LogPage:
    """A page of the filtered request log: the newest, or the one just older than record
    `before`, or just newer than record `after`.

    Paged by cursor rather than by page number: a busy organization has millions of
    records, and each page costs two short index reads (the page, and whether there is
    anything on its other side) instead of a count of them all.
    """
    records = usage_records_for_organization(organization=organization, filters=filters)
    if after is not None:
        rows = list(records.filter(pk__gt=after).order_by("pk")[: size + 1])
        has_newer, page = len(rows) > size, rows[:size][::-1]
        has_older = bool(page) and records.filter(pk__lt=page[-1].pk).exists()
    else:
        newest = records if before is None else records.filter(pk__lt=before)
        rows = list(newest[: size + 1])
        has_older, page = len(rows) > size, rows[:size]
        has_newer = before is not None and bool(page) and records.filter(pk__gt=page[0].pk).exists()
    return LogPage(
        records=page,
        older=page[-1].pk if has_older else None,
        newer=page[0].pk if has_newer else None,
    )


def usage_keys_for_organization(*, organization: Organization) -> QuerySet[ApiKey]:
    """Every key the organization has had, revoked ones too (their calls stay in the log)."""
    return ApiKey.objects.filter(organization=organization).order_by("name", "pk")


def usage_model_names() -> list[str]:
    """Every model a call can have named: the catalog's, disabled ones too (a usage record
    keeps its price, and through it its model, for ever)."""
    return list(LanguageModel.objects.order_by("name").values_list("name", flat=True))


# --- Daily rollups --------------------------------------------------------------------


def usage_window(*, today: date, days: int) -> tuple[datetime, datetime]:
    """The UTC instants that bound the `days` whole days ending with `today`: where the
    daily rollup buckets of those days start, and where the next day starts."""
    first = datetime.combine(today - timedelta(days=days - 1), time.min, tzinfo=UTC)
    return first, first + timedelta(days=days)


def usage_daily_rollups(
    *, organization: Organization, since: datetime, until: datetime
) -> QuerySet[UsageRollup]:
    """The organization's daily rollup rows from `since` to `until`, by day, model and key."""
    return (
        UsageRollup.objects.filter(
            organization=organization,
            period=RollupPeriod.DAY,
            period_start__gte=since,
            period_start__lt=until,
        )
        .select_related("api_key")
        .order_by("period_start", "model", "api_key_id")
    )


class UsageGrouping(models.TextChoices):
    MODEL = "model", gettext_lazy("By model")
    KEY = "key", gettext_lazy("By key")


@dataclass(frozen=True, slots=True)
class DailyGroup:
    """One model's (or key's) usage, one value per day of the window."""

    label: str
    cost_nano: tuple[Nano, ...]
    tokens: tuple[int, ...]  # prompt (cached included) and completion tokens
    requests: tuple[int, ...]

    @property
    def total_cost_nano(self) -> Nano:
        return sum(self.cost_nano)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


@dataclass(frozen=True, slots=True)
class DailyUsage:
    days: tuple[date, ...]
    groups: tuple[DailyGroup, ...]  # the most spent first

    @property
    def total_cost_nano(self) -> Nano:
        return sum(group.total_cost_nano for group in self.groups)

    @property
    def total_tokens(self) -> int:
        return sum(group.total_tokens for group in self.groups)

    @property
    def total_requests(self) -> int:
        return sum(sum(group.requests) for group in self.groups)


def key_label(*, name: str | None, prefix: str | None, last_four: str | None) -> str:
    """How the usage page names a key: its name and what is shown of it (as
    `ApiKey.display`), from the few columns a grouped query carries."""
    if prefix is None:
        return _("no key")
    display = f"{prefix}…{last_four}"
    return f"{name} ({display})" if name else display


def usage_daily(
    *, organization: Organization, today: date, days: int, by: UsageGrouping
) -> DailyUsage:
    """Spend, tokens and requests per day over the `days` days ending with `today` (UTC),
    per model or per key, from the daily rollups: one query, whatever the traffic."""
    since, until = usage_window(today=today, days=days)
    day_list = tuple(since.date() + timedelta(days=i) for i in range(days))
    group_fields = (
        ("model",)
        if by == UsageGrouping.MODEL
        else ("api_key_id", "api_key__name", "api_key__prefix", "api_key__last_four")
    )
    rows = (
        UsageRollup.objects.filter(
            organization=organization,
            period=RollupPeriod.DAY,
            period_start__gte=since,
            period_start__lt=until,
        )
        .values("period_start", *group_fields)
        .annotate(
            cost=Sum("cost_nano"),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            calls=Sum("requests"),
        )
        .order_by()
    )
    series: dict[object, tuple[str, list[int], list[int], list[int]]] = {}
    for row in rows:
        if by == UsageGrouping.MODEL:
            ident, label = row["model"], row["model"]
        else:
            ident = row["api_key_id"]
            label = key_label(
                name=row["api_key__name"],
                prefix=row["api_key__prefix"],
                last_four=row["api_key__last_four"],
            )
        _label, cost, tokens, calls = series.setdefault(
            ident, (label, [0] * days, [0] * days, [0] * days)
        )
        index = (row["period_start"].date() - day_list[0]).days
        cost[index] += row["cost"]
        tokens[index] += row["tokens"]
        calls[index] += row["calls"]
    groups = [
        DailyGroup(label=label, cost_nano=tuple(cost), tokens=tuple(tokens), requests=tuple(calls))
        for label, cost, tokens, calls in series.values()
    ]
    groups.sort(key=lambda group: (-group.total_cost_nano, -group.total_tokens, group.label))
    return DailyUsage(days=day_list, groups=tuple(groups))


def usage_ledger_problems() -> tuple[int, list[str]]:
    """Compare each usage record with its ledger transfer, and each charge with its record.

    Returns the number of records checked and what disagrees: a record whose charge is not
    exactly its transfer, a charge transfer no record accounts for, a settled hold without
    its record.
    """
    problems = []
    mismatched = UsageRecord.objects.filter(
        Q(transfer__isnull=True, charged_nano__gt=0)
        | Q(transfer__isnull=False) & ~Q(transfer__amount_nano=F("charged_nano"))
        | Q(transfer__isnull=False) & ~Q(transfer__kind=TransferKind.CHARGE)
    ).select_related("transfer")
    for record in mismatched[:100]:
        ledger = format_usd(record.transfer.amount_nano) if record.transfer else "no transfer"
        problems.append(
            f"usage record {record.request_id} charged {format_usd(record.charged_nano)} "
            f"but the ledger shows {ledger}"
        )
    orphans = Transfer.objects.filter(kind=TransferKind.CHARGE, usage_record__isnull=True)
    for transfer in orphans[:100]:
        problems.append(f"charge transfer #{transfer.pk} has no usage record")
    settled_ids = Hold.objects.filter(status=HoldStatus.SETTLED).values_list("request_id")
    unrecorded = settled_ids.difference(UsageRecord.objects.values_list("request_id"))
    for (request_id,) in unrecorded[:100]:
        problems.append(f"hold {request_id} was settled but has no usage record")
    return UsageRecord.objects.count(), problems


def usage_spend_by_key(*, organization: Organization, since: datetime) -> dict[int, Nano]:
    """What each of the organization's keys was charged since `since`, by key id (keys
    without charges are absent): one grouped query for a whole page of keys."""
    rows = (
        UsageRecord.objects.filter(
            organization=organization, created_at__gte=since, api_key__isnull=False
        )
        .values("api_key_id")
        .annotate(total=Sum("charged_nano"))
    )
    return {row["api_key_id"]: row["total"] for row in rows}
