from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management.base import CommandError

from apps.billing.models import Account, Transfer
from apps.billing.money import parse_usd
from apps.catalog.models import Price
from apps.keys.models import ApiKey, hash_key

ROOT = Path(__file__).resolve().parents[2]


def test_credit_posts_a_transfer_and_prints_the_new_balance(run_command, org):
    assert (
        run_command("credit", "--org", "acme", "--amount", "12.34")[-1]
        == "balance 12.340000000 USD"
    )
    lines = run_command("credit", "--org", "acme", "--amount", "0.000000001", "--note", "a nano")
    assert lines[-1] == "balance 12.340000001 USD"
    assert Transfer.objects.count() == 2
    assert Transfer.objects.order_by("pk").last().memo == "a nano"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--org", "nope", "--amount", "1"], "no organization"),
        (["--org", "acme", "--amount", "0"], "more than zero"),
        (["--org", "acme", "--amount", "-5"], "negative"),
        (["--org", "acme", "--amount", "1.0000000001"], "finer than"),
        (["--org", "acme", "--amount", "lots"], "not an amount"),
    ],
)
def test_credit_refuses_bad_input_and_moves_nothing(run_command, org, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("credit", *args)
    assert not Transfer.objects.exists()


def test_balance_prints_every_digit(run_command, org):
    assert run_command("balance", "--org", "acme")[-1] == "0.000000000"
    run_command("credit", "--org", "acme", "--amount", "12.34")
    assert run_command("balance", "--org", "acme")[-1] == "12.340000000"
    with pytest.raises(CommandError, match="no organization"):
        run_command("balance", "--org", "nope")


def test_reconcile_is_clean_on_consistent_books(run_command, funded_org):
    assert run_command("reconcile")[-1].startswith("books are clean")


def test_reconcile_reports_a_balance_that_does_not_match_its_ledger(run_command, funded_org):
    Account.objects.filter(organization=funded_org).update(balance_nano=1)  # a stray write
    with pytest.raises(SystemExit) as exit_info:
        run_command("reconcile")
    assert exit_info.value.code == 1


def test_demo_is_idempotent_and_prints_a_fresh_key_last(run_command):
    first = run_command("demo")
    second = run_command("demo")
    assert first[-1] != second[-1]
    assert ApiKey.objects.filter(key_hash=hash_key(second[-1])).exists()
    assert first[0] == second[0] == "demo organization demo: balance 10.00 USD"
    assert Transfer.objects.count() == 1
    assert run_command("reconcile")[-1].startswith("books are clean")


def test_demo_prices_claude_cache_writes_as_anthropic_does_and_others_at_input(run_command):
    run_command("demo")
    rates = dict(
        Price.objects.values_list("model__name", "cache_write_nano_per_mtok").order_by("pk")
    )
    assert rates == {
        "gpt-4o": parse_usd("2.50"),
        "gpt-4o-mini": parse_usd("0.15"),
        "claude-sonnet-4": parse_usd("3.75"),
    }


def test_a_refused_command_exits_non_zero_with_a_clear_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "REAL200_VAR_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    result = subprocess.run(
        [sys.executable, "manage.py", "credit", "--org", "ghost", "--amount", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2  # argparse: a bad argument is a usage error
    assert "no organization with slug 'ghost'" in result.stderr
