"""A database trigger that refuses UPDATE and DELETE on the ledger.

Model methods already refuse both, but a bulk queryset call or a hand-written SQL
statement would bypass them; the trigger makes history immutable whoever writes. The
statements differ between PostgreSQL and the embedded SQLite default, so both ship.
"""

from django.db import migrations

POSTGRES_FORWARD = """
CREATE OR REPLACE FUNCTION billing_transfer_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger transfers are immutable: post a correcting transfer';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER billing_transfer_immutable
    BEFORE UPDATE OR DELETE ON billing_transfer
    FOR EACH ROW EXECUTE FUNCTION billing_transfer_immutable();
"""
POSTGRES_REVERSE = """
DROP TRIGGER IF EXISTS billing_transfer_immutable ON billing_transfer;
DROP FUNCTION IF EXISTS billing_transfer_immutable();
"""
SQLITE_FORWARD = [
    """
    CREATE TRIGGER billing_transfer_no_update BEFORE UPDATE ON billing_transfer
    BEGIN SELECT RAISE(ABORT, 'ledger transfers are immutable: post a correcting transfer'); END;
    """,
    """
    CREATE TRIGGER billing_transfer_no_delete BEFORE DELETE ON billing_transfer
    BEGIN SELECT RAISE(ABORT, 'ledger transfers are immutable: post a correcting transfer'); END;
    """,
]
SQLITE_REVERSE = [
    "DROP TRIGGER IF EXISTS billing_transfer_no_update;",
    "DROP TRIGGER IF EXISTS billing_transfer_no_delete;",
]


def _run(schema_editor, statements) -> None:
    for statement in statements:
        schema_editor.execute(statement)


def forward(apps, schema_editor) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        _run(schema_editor, [POSTGRES_FORWARD])
    elif vendor == "sqlite":
        _run(schema_editor, SQLITE_FORWARD)


def reverse(apps, schema_editor) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        _run(schema_editor, [POSTGRES_REVERSE])
    elif vendor == "sqlite":
        _run(schema_editor, SQLITE_REVERSE)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(forward, reverse)]
