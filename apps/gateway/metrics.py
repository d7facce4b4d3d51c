"""Prometheus metrics for /metrics.

Under several worker processes, prometheus_client's multiprocess mode aggregates what each
process wrote into PROMETHEUS_MULTIPROC_DIR (`platform/serve` sets it); without it, one
process reports its own counters.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

if TYPE_CHECKING:
    from apps.usage.services import CallOutcome

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("real200_requests_total", "API requests answered", ["model", "status"])
LATENCY = Histogram(
    "real200_request_duration_seconds",
    "From request to the last byte (streams: the whole stream)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "real200_time_to_first_token_seconds",
    "From request to the first generated chunk",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "real200_upstream_errors_total", "Upstream failures by channel", ["channel", "kind"]
)
TOKENS = Counter("real200_tokens_total", "Tokens billed", ["model", "kind"])
SPEND = Counter("real200_spend_nano_usd_total", "Cost billed, in nano-dollars", ["model"])
REFUSED_FOR_QUOTA = Counter(
    "real200_quota_refusals_total", "Calls refused with 402 before reaching an upstream", ["model"]
)


def observe_call(outcome: CallOutcome, charged_nano: int) -> None:
    model = outcome.model
    LATENCY.labels(model=model).observe(outcome.latency_ms / 1000)
    if outcome.ttft_ms is not None:
        TIME_TO_FIRST_TOKEN.labels(model=model).observe(outcome.ttft_ms / 1000)
    TOKENS.labels(model=model, kind="prompt").inc(outcome.prompt_tokens)
    TOKENS.labels(model=model, kind="cached").inc(outcome.cached_tokens)
    TOKENS.labels(model=model, kind="cache_write").inc(outcome.cache_write_tokens)
    TOKENS.labels(model=model, kind="completion").inc(outcome.completion_tokens)
    SPEND.labels(model=model).inc(charged_nano)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = DEFAULT_REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
