"""Redemption codes: minted once, stored as hashes, redeemed once into one organization."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import time_machine
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.utils import timezone

from apps.billing.models import AccountKind, RedemptionCode, Transfer, TransferKind
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.services import system_account
from apps.billing.topups import (
    CODE_ALPHABET,
    CodeRedemptionError,
    TopupError,
    code_canonical,
    code_hash,
    code_mint,
    code_redeem,
)
from apps.tenancy.models import User
from apps.tenancy.services import organization_create

CODE_SHAPE = re.compile(rf"^R200(-[{CODE_ALPHABET}]{{4}}){{4}}$")
TEN = parse_usd("10.00")


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _mint_one(**kwargs) -> str:
    [code] = code_mint(
        amount_nano=kwargs.pop("amount_nano", TEN), count=1, batch="t", created_by=None, **kwargs
    )
    return code


def test_minted_codes_have_the_shape_and_only_their_hash_and_last_four_are_stored(owner):
    codes = code_mint(amount_nano=TEN, count=5, batch="launch", created_by=owner)
    assert len(set(codes)) == 5
    assert all(CODE_SHAPE.match(code) for code in codes)
    assert not set("01IO") & set("".join(code[5:] for code in codes))
    rows = {row.code_hash: row for row in RedemptionCode.objects.all()}
    for code in codes:
        row = rows[code_hash(code)]
        assert (row.last_four, row.batch, row.amount_nano) == (code[-4:], "launch", TEN)
        assert row.created_by == owner
        assert row.redeemed_at is None
    stored = repr(list(RedemptionCode.objects.values()))
    assert not any(code in stored or code.replace("-", "") in stored for code in codes)
    assert Transfer.objects.count() == 0  # minting moves no money


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount_nano": 0}, "more than zero"),
        ({"count": 0}, "between 1 and"),
        ({"count": 10_001}, "between 1 and"),
        ({"batch": "x" * 101}, "too long"),
        ({"expires_at": "past"}, "future"),
    ],
)
def test_minting_refuses_bad_input_and_writes_nothing(db, kwargs, message):
    if kwargs.get("expires_at") == "past":
        kwargs["expires_at"] = timezone.now() - timedelta(seconds=1)
    arguments = {"amount_nano": TEN, "count": 1, "batch": "", "created_by": None, **kwargs}
    with pytest.raises(TopupError, match=message):
        code_mint(**arguments)
    assert RedemptionCode.objects.count() == 0


def test_a_code_credits_the_organization_once_from_top_up_clearing(org, owner):
    code = _mint_one()
    transfer = code_redeem(code=code, organization=org, user=owner)
    assert transfer.kind == TransferKind.REDEMPTION
    assert transfer.amount_nano == TEN
    assert transfer.idempotency_key == f"code:{code_hash(code)}"
    assert transfer.from_account == system_account(AccountKind.TOPUP_CLEARING)
    assert transfer.created_by == owner
    assert available_nano_for_organization(organization=org) == TEN
    row = RedemptionCode.objects.get()
    assert (row.redeemed_by_organization, row.redeemed_by_user) == (org, owner)
    assert row.redeemed_at is not None
    assert row.transfer == transfer
    _assert_books_clean()


def test_a_code_is_accepted_as_people_type_it(org, owner):
    code = _mint_one()
    typed = " " + code.lower().replace("-", " ") + "\n"
    assert code_canonical(typed) == code
    assert code_canonical(code[5:].replace("-", "")) == code  # without the prefix
    code_redeem(code=typed, organization=org, user=owner)
    assert available_nano_for_organization(organization=org) == TEN


def test_a_reused_code_is_refused_even_for_another_organization(org, owner, outsider):
    code = _mint_one()
    code_redeem(code=code, organization=org, user=owner)
    elsewhere = outsider.memberships.get().organization
    for organization, user in ((org, owner), (elsewhere, outsider)):
        with pytest.raises(CodeRedemptionError, match="invalid or already used"):
            code_redeem(code=code, organization=organization, user=user)
    assert Transfer.objects.count() == 1
    assert available_nano_for_organization(organization=elsewhere) == 0
    _assert_books_clean()


@pytest.mark.parametrize(
    "code",
    ["", "R200", "R200-AAAA-AAAA-AAAA", "R200-AAAA-AAAA-AAAA-AAA0", "R200-" + "A" * 20, "💸"],
)
def test_an_unknown_or_malformed_code_reads_like_a_used_one_and_writes_nothing(org, owner, code):
    _mint_one()
    with pytest.raises(CodeRedemptionError) as refused:
        code_redeem(code=code, organization=org, user=owner)
    assert str(refused.value) == "this code is invalid or already used"
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_an_unknown_well_formed_code_is_refused(org, owner):
    _mint_one()
    with pytest.raises(CodeRedemptionError, match="invalid or already used"):
        code_redeem(code="R200-AAAA-BBBB-CCCC-DDDD", organization=org, user=owner)
    assert Transfer.objects.count() == 0


def test_an_expired_code_is_refused_and_stays_unredeemed(org, owner):
    code = _mint_one(expires_at=timezone.now() + timedelta(days=1))
    later = timezone.now() + timedelta(days=1, seconds=1)
    with time_machine.travel(later), pytest.raises(CodeRedemptionError, match="expired"):
        code_redeem(code=code, organization=org, user=owner)
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None
    _assert_books_clean()


def test_a_code_before_its_expiry_is_redeemed(org, owner):
    code = _mint_one(expires_at=timezone.now() + timedelta(days=1))
    with time_machine.travel(timezone.now() + timedelta(hours=23)):
        code_redeem(code=code, organization=org, user=owner)
    assert available_nano_for_organization(organization=org) == TEN


# --- the CLI --------------------------------------------------------------------------


def test_mint_codes_prints_each_code_then_a_summary_last(run_command):
    lines = run_command(
        "mint_codes", "--amount", "10.00", "--count", "3", "--batch", "fair", "--expires-in", "30"
    )
    codes, summary = lines[:-1], lines[-1]
    assert len(codes) == 3
    assert all(CODE_SHAPE.match(code) for code in codes)
    assert summary.startswith("minted 3 codes of 10.000000000 USD in batch fair, expiring ")
    rows = RedemptionCode.objects.filter(batch="fair")
    assert {row.code_hash for row in rows} == {code_hash(code) for code in codes}
    assert all(row.expires_at > timezone.now() + timedelta(days=29) for row in rows)


def test_mint_codes_without_a_batch_says_so_briefly(run_command):
    lines = run_command("mint_codes", "--amount", "0.50", "--count", "1")
    assert lines[-1] == "minted 1 codes of 0.500000000 USD"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--amount", "0", "--count", "1"], "--amount"),
        (["--amount", "-5", "--count", "1"], "negative"),
        (["--amount", "ten", "--count", "1"], "not an amount"),
        (["--amount", "1.0000000001", "--count", "1"], "finer"),
        (["--amount", "1", "--count", "0"], "between 1 and"),
        (["--amount", "1", "--count", "x"], "invalid int"),
        (["--amount", "1", "--count", "1", "--expires-in", "0"], "at least 1 day"),
        (["--amount", "1", "--count", "1", "--batch", "b" * 101], "too long"),
    ],
)
def test_mint_codes_refuses_bad_input(run_command, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("mint_codes", *args)
    assert RedemptionCode.objects.count() == 0


# --- under real concurrency (PostgreSQL) ------------------------------------------------


def _two_organizations() -> tuple[tuple[User, object], tuple[User, object]]:
    pairs = []
    for name in ("race-a", "race-b"):
        user = User.objects.create_user(email=f"{name}@example.com", password="x-long-password")
        pairs.append((user, organization_create(slug=name, name=name, owner=user)))
    return pairs[0], pairs[1]


def _wait_until_a_session_waits_for_a_lock(deadline_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
        time.sleep(0.01)
    raise AssertionError("the second session never waited for the code's row")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_code_redeemed_from_two_sessions_at_once_credits_once():
    """The race the conditional claim is for: the second session reads the code as unused
    (the first has not committed), then waits on the row; when the first commits, its claim
    matches nothing and it gets the clear error."""
    (user_a, org_a), (user_b, org_b) = _two_organizations()
    code = _mint_one()
    first_redeemed, commit_first = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            with transaction.atomic():
                outcome["first"] = code_redeem(code=code, organization=org_a, user=user_a)
                first_redeemed.set()
                commit_first.wait(10)
        finally:
            connection.close()

    def second() -> None:
        first_redeemed.wait(10)
        try:
            outcome["second"] = code_redeem(code=code, organization=org_b, user=user_b)
        except CodeRedemptionError as exc:
            outcome["second"] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert first_redeemed.wait(10)
    _wait_until_a_session_waits_for_a_lock()
    commit_first.set()
    for thread in threads:
        thread.join(10)
    assert isinstance(outcome["first"], Transfer)
    assert isinstance(outcome["second"], CodeRedemptionError)
    assert str(outcome["second"]) == "this code is invalid or already used"
    assert available_nano_for_organization(organization=org_a) == TEN
    assert available_nano_for_organization(organization=org_b) == 0
    assert Transfer.objects.filter(kind=TransferKind.REDEMPTION).count() == 1
    assert RedemptionCode.objects.get().redeemed_by_organization == org_a
    _assert_books_clean()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_code_tried_by_many_sessions_at_the_same_moment_credits_once():
    (user_a, org_a), (user_b, org_b) = _two_organizations()
    code = _mint_one()
    start = threading.Barrier(8)

    def attempt(i: int) -> bool:
        user, org = (user_a, org_a) if i % 2 else (user_b, org_b)
        try:
            start.wait(10)
            code_redeem(code=code, organization=org, user=user)
            return True
        except CodeRedemptionError:
            return False
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count(True) == 1
    balances = [available_nano_for_organization(organization=org) for org in (org_a, org_b)]
    assert sorted(balances) == [0, TEN]
    assert Transfer.objects.count() == 1
    _assert_books_clean()
