"""The start of a call (apps.gateway.calls.open_call) when its client leaves meanwhile, or
when what a refused call took cannot be given back.

The rate limits and the hold are sent before the call waits for them, and a client that
leaves cannot lose their answers; what they took is then given back as soon as they
finish, not when the hold expires. These run on the real PostgreSQL and Redis, in an
event loop of their own.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from apps.billing.models import Hold, HoldStatus
from apps.billing.services import account_id_for_organization
from apps.gateway import calls
from apps.gateway.validation import validate_chat_request
from apps.keys import limits
from apps.keys.models import ApiKey
from apps.keys.selectors import KeyGrant
from config.asyncdb import db_step, fetch_one
from tests.dashboard.people import make_callable
from tests.usage.test_async_statements import _customer, run

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize(
    "budget_nano",
    [None, 10**12],
    ids=["held by the one statement", "held in a worker thread (a key with a budget)"],
)
def test_a_client_that_leaves_while_its_call_is_admitted_leaves_nothing_held(
    funded_org, api_key, price, budget_nano
):
    make_callable("gpt-4o")
    ApiKey.objects.filter(pk=api_key.pk).update(budget_nano=budget_nano)
    grant = KeyGrant.of(ApiKey.objects.select_related("organization").get(pk=api_key.pk))
    request = validate_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    )
    balance = _customer(funded_org).balance_nano

    async def leave_while_admitted() -> str:
        # A warm process: the route and the tokenizer are loaded, so the call's first
        # wait is its admission (the rate limits and the hold).
        await calls.resolve_route(grant, "gpt-4o")
        await calls.estimate_prompt_tokens(request)
        window = limits._window(time.time())[0]
        opening = asyncio.ensure_future(
            calls.open_call(
                call_id="chatcmpl-left", grant=grant, request=request, started=time.monotonic()
            )
        )
        await asyncio.sleep(0)  # the call starts and waits for its admission
        assert not opening.done()
        opening.cancel()  # the client leaves
        with pytest.raises(asyncio.CancelledError):
            await opening
        await calls.late_settlements_finish()  # the undo runs once the steps finish
        counter = limits._counter("tpm", grant.id, window)
        [(reserved, _added)] = await limits.counters().add([(counter, 0, limits.ALWAYS)])
        # What the process reserved ahead for its next calls and has not spent is not
        # this call's (see limits._Allowances).
        allowance = limits._allowances._by_counter.get(counter)
        return reserved - (allowance.left if allowance else 0)

    reserved_tokens = run(leave_while_admitted())

    hold = Hold.objects.get(request_id="chatcmpl-left")  # it was placed, then released
    assert hold.status == HoldStatus.RELEASED
    customer = _customer(funded_org)
    assert (customer.balance_nano, customer.held_nano) == (balance, 0)
    assert reserved_tokens == 0  # its tokens went back too


def test_a_refused_call_whose_hold_cannot_be_released_is_still_answered_429(
    funded_org, api_key, price, caplog
):
    """The key is past its requests per minute while the call's hold is placed beside the
    check; the release of that hold then fails (the database no longer takes new
    connections, for real: a closed port). The client still gets its 429, not a 503, and
    the hold stays open to expire; the failure is logged with its expiry."""
    from django.db import connections

    make_callable("gpt-4o")
    ApiKey.objects.filter(pk=api_key.pk).update(rpm=1)
    grant = KeyGrant.of(ApiKey.objects.select_related("organization").get(pk=api_key.pk))
    request = validate_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    )
    database = connections["default"]
    settings_dict = database.settings_dict

    async def refused_while_the_database_goes_away() -> calls.RateLimited:
        # Warm: the route, the tokenizer, the account's id and the event loop's pool are
        # ready, so the only new connection the call needs is the release's.
        await calls.resolve_route(grant, "gpt-4o")
        await calls.estimate_prompt_tokens(request)
        await db_step(account_id_for_organization, organization_id=grant.organization_id)
        await fetch_one("SELECT 1", {})
        window = limits._window(time.time())[0]
        await limits.counters().add([(limits._counter("rpm-key", grant.id, window), 1, -1)])
        # The worker threads' pool starts again, aimed where nothing listens; the event
        # loop's pool, which places the hold, keeps its connection.
        saved = settings_dict["PORT"], settings_dict["OPTIONS"]["pool"]
        settings_dict["PORT"] = "1"
        settings_dict["OPTIONS"]["pool"] = {**saved[1], "timeout": 0.5}
        database.close_pool()
        try:
            with pytest.raises(calls.RateLimited) as refused:
                await calls.open_call(
                    call_id="chatcmpl-refused", grant=grant, request=request, started=0.0
                )
        finally:
            settings_dict["PORT"], settings_dict["OPTIONS"]["pool"] = saved
            database.close_pool()
        return refused.value

    refusal = run(refused_while_the_database_goes_away())

    assert refusal.status == 429
    hold = Hold.objects.get(request_id="chatcmpl-refused")
    assert hold.status == HoldStatus.OPEN  # left to expire
    assert _customer(funded_org).held_nano == hold.amount_nano
    assert "its hold could not be released; it expires at" in caplog.text


def test_a_call_whose_rate_limits_cannot_be_asked_gives_its_hold_back(
    funded_org, api_key, price, monkeypatch
):
    """The hold is sent before the rate limits; if asking for those fails outright (a bug,
    not Redis being down, which fails open), the call fails and its hold is released at
    once, not left to expire."""
    make_callable("gpt-4o")
    grant = KeyGrant.of(ApiKey.objects.select_related("organization").get(pk=api_key.pk))
    request = validate_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    )
    balance = _customer(funded_org).balance_nano

    def broken(*args, **kwargs):
        raise RuntimeError("the limiter could not be asked")

    monkeypatch.setattr(calls, "call_admit_start", broken)

    async def open_it() -> None:
        await calls.open_call(
            call_id="chatcmpl-unasked", grant=grant, request=request, started=time.monotonic()
        )

    with pytest.raises(RuntimeError):
        run(open_it())

    hold = Hold.objects.get(request_id="chatcmpl-unasked")  # it was placed, then released
    assert hold.status == HoldStatus.RELEASED
    customer = _customer(funded_org)
    assert (customer.balance_nano, customer.held_nano) == (balance, 0)
