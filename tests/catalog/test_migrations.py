"""The catalog's data migrations, run forward over rows written before them."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from apps.catalog.models import Price


def _migrate(targets: list[tuple[str, str]] | None = None):
    """Migrate to `targets` (None: the newest migration of every app); return the app
    registry of the state they leave."""
    executor = MigrationExecutor(connection)
    targets = targets or executor.loader.graph.leaf_nodes()
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_a_price_set_before_cache_write_rates_bills_cache_writes_at_its_input_rate():
    old = _migrate([("catalog", "0001_initial")])
    try:
        model = old.get_model("catalog", "LanguageModel").objects.create(name="claude-sonnet-4")
        old.get_model("catalog", "Price").objects.create(
            model=model,
            input_nano_per_mtok=3_000_000_000,
            output_nano_per_mtok=15_000_000_000,
            cached_input_nano_per_mtok=300_000_000,
        )
    finally:
        _migrate()
    price = Price.objects.get()
    assert price.cache_write_nano_per_mtok == price.input_nano_per_mtok == 3_000_000_000
    assert price.cached_input_nano_per_mtok == 300_000_000
