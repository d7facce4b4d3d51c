"""CSV exports of usage, written row by row as the database hands them over.

The rows come from an asynchronous iterator: under ASGI, Django streams an async iterator
as it goes, but reads a synchronous one whole into memory first, which a log of millions
of calls must not be. Money is written as exact USD strings (`format_usd`, nine places),
times as ISO 8601 in UTC; column names are fixed English identifiers for programs to
read, not translated.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from typing import Any

from django.db.models import QuerySet
from django.http import StreamingHttpResponse

from apps.billing.money import format_usd
from apps.keys.models import ApiKey
from apps.usage.models import UsageRecord, UsageRollup

CHUNK_ROWS = 2000

DAILY_COLUMNS = (
    "date",
    "model",
    "key",
    "key_name",
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "cost_usd",
)
REQUEST_COLUMNS = (
    "time_utc",
    "request_id",
    "key",
    "key_name",
    "model",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "cost_usd",
    "charged_usd",
    "latency_ms",
    "status",
    "end_reason",
    "stream",
)
# A cell that a spreadsheet would take for a formula (CSV injection): key names are typed
# by customers, and an export is opened by someone else.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class _Echo:
    """A file that hands back what is written: csv.writer then returns each line."""

    def write(self, value: str) -> str:
        return value


def _text(value: str) -> str:
    return f"'{value}" if value.startswith(_FORMULA_START) else value


def _key_cells(key: ApiKey | None) -> tuple[str, str]:
    return (key.display, _text(key.name)) if key else ("", "")


async def _lines(
    header: tuple[str, ...], rows: AsyncIterator[tuple[Any, ...]]
) -> AsyncIterator[str]:
    writer = csv.writer(_Echo())
    # A byte-order mark first: without one, Excel reads a CSV in the system's code page
    # (GBK on a Chinese Windows) and garbles every name that is not ASCII.
    yield "\ufeff" + writer.writerow(header)
    async for row in rows:
        yield writer.writerow(row)


async def _daily_rows(rollups: QuerySet[UsageRollup]) -> AsyncIterator[tuple[Any, ...]]:
    async for rollup in rollups.aiterator(chunk_size=CHUNK_ROWS):
        yield (
            rollup.period_start.date().isoformat(),
            rollup.model,
            *_key_cells(rollup.api_key),
            rollup.requests,
            rollup.prompt_tokens,
            rollup.cached_tokens,
            rollup.cache_write_tokens,
            rollup.completion_tokens,
            format_usd(rollup.cost_nano),
        )


async def _request_rows(records: QuerySet[UsageRecord]) -> AsyncIterator[tuple[Any, ...]]:
    async for record in records.aiterator(chunk_size=CHUNK_ROWS):
        yield (
            record.created_at.isoformat(),
            record.request_id,
            *_key_cells(record.api_key),
            record.model,
            record.prompt_tokens,
            record.cached_tokens,
            record.cache_write_tokens,
            record.completion_tokens,
            format_usd(record.cost_nano),
            format_usd(record.charged_nano),
            record.latency_ms,
            record.status_code,
            record.end_reason,
            "true" if record.is_stream else "false",
        )


def _csv_response(filename: str, lines: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def daily_csv_response(*, filename: str, rollups: QuerySet[UsageRollup]) -> StreamingHttpResponse:
    return _csv_response(filename, _lines(DAILY_COLUMNS, _daily_rows(rollups)))


def requests_csv_response(
    *, filename: str, records: QuerySet[UsageRecord]
) -> StreamingHttpResponse:
    return _csv_response(filename, _lines(REQUEST_COLUMNS, _request_rows(records)))
