"""Every 4xx of API.md from a live real200: the status, OpenAI's error body, an
x-request-id, and proof that nothing else happened (no ledger row, no hold, no usage
record, nothing sent upstream)."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from apps.billing.models import Hold
from apps.catalog.models import LanguageModel
from apps.catalog.services import price_set
from apps.keys.models import KEY_PREFIX, KEY_RANDOM_LENGTH, ApiKey, hash_key
from apps.keys.services import key_create, key_revoke
from tests.gateway.bad_requests import BAD_REQUESTS, BASE
from tests.keys.test_limits import _away_from_a_window_edge
from tests.openapi import assert_valid

pytestmark = pytest.mark.postgres


def assert_error(response: httpx.Response, status: int, kind: str, **fields) -> dict:
    """An answer in OpenAI's error shape, with its request id; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert_valid("ErrorResponse", body)
    error = body["error"]
    assert error["type"] == kind
    assert error["message"]
    for name, value in fields.items():
        assert error[name] == value, (name, error)
    return error


class NothingHappened:
    """Snapshot of everything a refused call must leave as it was."""

    def __init__(self, live) -> None:
        self.live = live
        self.ledger = live.ledger_size()
        self.balance = live.balance_nano()
        self.holds = Hold.objects.count()

    def check(self) -> None:
        assert self.live.ledger_size() == self.ledger
        assert self.live.balance_nano() == self.balance
        assert Hold.objects.count() == self.holds
        assert self.live.held_nano() == 0
        assert self.live.records() == []
        assert self.live.upstream.calls == []


def test_every_bad_parameter_is_a_400_naming_it_and_nothing_happens(live):
    unchanged = NothingHappened(live)
    request_ids = set()
    headers = {"Authorization": f"Bearer {live.key}"}
    with httpx.Client(base_url=live.url, headers=headers) as client:
        for case in BAD_REQUESTS:
            body, param = case.values
            response = client.post("/v1/chat/completions", json=body)
            assert_error(response, 400, "invalid_request_error", param=param)
            request_ids.add(response.headers["x-request-id"])
    assert len(request_ids) == len(BAD_REQUESTS)
    unchanged.check()


def test_a_body_that_is_not_json_is_a_400(live):
    unchanged = NothingHappened(live)
    headers = {"Authorization": f"Bearer {live.key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=live.url, headers=headers) as client:
        for raw in (b"{not json", b"", b'{"model": "gpt-4o",', b"\xff\xfe{}", b"NaN"):
            response = client.post("/v1/chat/completions", content=raw)
            error = assert_error(response, 400, "invalid_request_error", param=None)
            assert "JSON" in error["message"], raw
    unchanged.check()


def test_max_tokens_above_the_models_limit_is_a_400(live):
    unchanged = NothingHappened(live)
    for field in ("max_tokens", "max_completion_tokens"):
        for stream in (False, True):
            response = live.post({**BASE, field: 4097, "stream": stream})
            error = assert_error(response, 400, "invalid_request_error", param=field)
            assert "4096" in error["message"]
    unchanged.check()


def test_the_sdk_raises_bad_request_for_a_bad_parameter(live):
    with pytest.raises(openai.BadRequestError) as refused:
        live.sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], temperature=3
        )
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "temperature"
    assert refused.value.body["type"] == "invalid_request_error"


# --- Keys ---------------------------------------------------------------------------------


UNKNOWN_KEY = KEY_PREFIX + "A" * KEY_RANDOM_LENGTH  # well formed, but nobody's


def test_a_missing_malformed_or_unknown_key_is_a_401(live):
    unchanged = NothingHappened(live)
    authorizations = [
        None,
        "",
        "Bearer",
        "Basic c2stcmVhbDIwMA==",
        f"Token {live.key}",
        "Bearer sk-real200-short",
        f"Bearer {live.key}x",
        f"Bearer {live.key.replace(KEY_PREFIX, 'sk-other-')}",
        f"Bearer {UNKNOWN_KEY}",
    ]
    url = f"{live.url}/v1/chat/completions"
    for authorization in authorizations:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = httpx.post(url, json=BASE, headers=headers)
        assert_error(response, 401, "invalid_api_key", code="invalid_api_key")
    unchanged.check()


def test_the_sdk_raises_authentication_error_for_an_unknown_key(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=UNKNOWN_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_an_address_sending_unknown_keys_is_refused_lookups_until_the_minute_ends(live, settings):
    """Each unknown key costs a database lookup: past the limit, an address's keys that
    are in no cache are refused with a 429 instead, while its cached keys still pass and
    other addresses are not touched."""
    settings.GATEWAY_UNKNOWN_KEYS_PER_MINUTE = 3
    settings.TRUSTED_PROXIES = ["127.0.0.1"]  # the test's client speaks for other addresses
    guesser, neighbour = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "203.0.113.8"}
    organization = ApiKey.objects.get(key_hash=hash_key(live.key)).organization
    _key, unused_yet = key_create(organization=organization, name="not yet in any cache")
    unchanged = NothingHappened(live)
    _away_from_a_window_edge()

    def models(key: str, address: dict) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", **address}
        return httpx.get(f"{live.url}/v1/models", headers=headers)

    assert models(live.key, guesser).status_code == 200  # now in the caches
    for malformed in ("sk-proj-abc", KEY_PREFIX + "short", "sk-ant-xyz", "x", "sk-1"):
        assert_error(models(malformed, guesser), 401, "invalid_api_key")  # free: not counted
    for n in range(3):
        assert_error(
            models(KEY_PREFIX + str(n) * KEY_RANDOM_LENGTH, guesser), 401, "invalid_api_key"
        )
    refused = models(KEY_PREFIX + "9" * KEY_RANDOM_LENGTH, guesser)
    error = assert_error(refused, 429, "rate_limit_exceeded", code="too_many_unknown_keys")
    assert "203.0.113.7" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert models(unused_yet, guesser).status_code == 429  # not looked up
    assert models(live.key, guesser).status_code == 200  # cached: still passes
    assert models(unused_yet, neighbour).status_code == 200
    unchanged.check()


def _wait_refused(live, key: str, seconds: float = 3.0) -> httpx.Response:
    """Revocation reaches a process that has just seen the key within a second: poll a
    free endpoint until it answers 401."""
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        response = httpx.get(f"{live.url}/v1/models", headers=headers)
        if response.status_code == 401 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_a_revoked_key_is_a_401(live):
    assert live.post({**BASE, "max_tokens": 5}).status_code == 200  # known to every cache
    live.upstream.calls.clear()
    ledger, holds, records = live.ledger_size(), Hold.objects.count(), live.records()
    key_revoke(key=ApiKey.objects.get(key_hash=hash_key(live.key)))
    assert_error(_wait_refused(live, live.key), 401, "invalid_api_key")
    error = assert_error(live.post(BASE), 401, "invalid_api_key", code="invalid_api_key")
    assert "revoked" in error["message"]
    assert (live.ledger_size(), Hold.objects.count(), live.records()) == (ledger, holds, records)
    assert live.upstream.calls == []


def test_an_expired_key_with_a_bad_body_is_still_a_401(live):
    key = live.key_for()
    ApiKey.objects.filter(key_hash=hash_key(key)).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    unchanged = NothingHappened(live)
    error = assert_error(live.post({"temperature": 9}, key=key), 401, "invalid_api_key")
    assert "expired" in error["message"]
    unchanged.check()


def test_an_expired_key_is_a_401(live):
    key = live.key_for()
    ApiKey.objects.filter(key_hash=hash_key(key)).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    unchanged = NothingHappened(live)
    error = assert_error(live.post(BASE, key=key), 401, "invalid_api_key", code="invalid_api_key")
    assert "expired" in error["message"]
    assert_error(
        httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"}),
        401,
        "invalid_api_key",
    )
    unchanged.check()


def test_a_key_may_not_call_a_model_outside_its_list(live):
    key = live.key_for(allowed_models=["claude-sonnet-4"])
    unchanged = NothingHappened(live)
    response = live.post(BASE, key=key)
    assert_error(response, 403, "permission_error", code="model_not_allowed", param="model")
    unchanged.check()


def test_a_key_may_not_be_used_from_an_address_outside_its_list(live):
    key = live.key_for(allowed_ips=["10.0.0.0/8"])
    unchanged = NothingHappened(live)
    assert_error(live.post(BASE, key=key), 403, "permission_error", code="ip_not_allowed")
    assert_error(
        httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"}),
        403,
        "permission_error",
        code="ip_not_allowed",
    )
    unchanged.check()


# --- Models, sizes, methods ---------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-9", "gpt-4o\x00"], ids=["unknown", "with-nul"])
def test_an_unknown_model_is_a_404_model_not_found(live, model):
    unchanged = NothingHappened(live)
    response = live.post({**BASE, "model": model})
    assert_error(response, 404, "invalid_request_error", code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError):
        live.sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    unchanged.check()


def test_a_model_nobody_serves_or_that_is_disabled_is_a_404(live):
    price_set(model_name="unserved", input_nano_per_mtok=1, output_nano_per_mtok=1)
    LanguageModel.objects.filter(name="gpt-4o").update(is_enabled=False)
    unchanged = NothingHappened(live)
    for model in ("unserved", "gpt-4o"):
        response = live.post({**BASE, "model": model})
        assert_error(response, 404, "invalid_request_error", code="model_not_found")
    unchanged.check()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413(live, settings, chunked):
    settings.GATEWAY_MAX_BODY_BYTES = 2048
    body = httpx.Request(
        "POST", "/", json={**BASE, "messages": [{"role": "user", "content": "x" * 3000}]}
    ).content
    content = iter([body[:1000], body[1000:]]) if chunked else body
    unchanged = NothingHappened(live)
    response = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {live.key}", "Content-Type": "application/json"},
    )
    assert_error(response, 413, "invalid_request_error", code="request_too_large")
    unchanged.check()


def test_a_body_just_under_the_limit_is_served(live, settings):
    settings.GATEWAY_MAX_BODY_BYTES = 2048
    assert (
        live.post({**BASE, "messages": [{"role": "user", "content": "x" * 1800}]}).status_code
        == 200
    )


def test_a_wrong_method_is_a_405(live):
    headers = {"Authorization": f"Bearer {live.key}"}
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = httpx.request(method, f"{live.url}/v1/chat/completions", headers=headers)
        assert_error(response, 405, "invalid_request_error", code="method_not_allowed")
    assert live.upstream.calls == []


def test_an_unknown_endpoint_is_an_openai_404(live):
    response = httpx.post(
        f"{live.url}/v1/embeddings", json={}, headers={"Authorization": f"Bearer {live.key}"}
    )
    assert_error(response, 404, "invalid_request_error", code="unknown_url")
