"""GET /v1/models and /v1/models/{id} against a live real200: the models this key may
call, in OpenAI's shapes, and nothing else."""

from __future__ import annotations

import httpx
import openai
import pytest

from apps.catalog.models import LanguageModel
from apps.catalog.services import price_set
from tests.gateway.test_errors import UNKNOWN_KEY, assert_error
from tests.openapi import assert_valid

pytestmark = pytest.mark.postgres


def get(live, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(
        f"{live.url}/v1/{path}", headers={"Authorization": f"Bearer {key or live.key}"}
    )


def test_the_list_holds_every_callable_model(live, claude):
    price_set(model_name="unserved", input_nano_per_mtok=1, output_nano_per_mtok=1)
    response = get(live, "models")
    assert response.status_code == 200
    assert response.headers["x-request-id"]
    body = response.json()
    assert_valid("ListModelsResponse", body)
    assert [model["id"] for model in body["data"]] == ["claude-sonnet-4", "gpt-4o"]
    for model in body["data"]:
        assert_valid("Model", model)
        assert model["object"] == "model"


def test_a_key_limited_to_some_models_sees_only_those(live, claude):
    key = live.key_for(allowed_models=["gpt-4o"])
    body = get(live, "models", key).json()
    assert_valid("ListModelsResponse", body)
    assert [model["id"] for model in body["data"]] == ["gpt-4o"]
    one = get(live, "models/gpt-4o", key)
    assert one.status_code == 200
    assert_valid("Model", one.json())
    assert one.json()["id"] == "gpt-4o"
    hidden = get(live, "models/claude-sonnet-4", key)
    assert_error(hidden, 404, "invalid_request_error", code="model_not_found", param="model")
    # ...and it may not call the one it cannot see.
    refused = live.post(
        {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "x"}]}, key=key
    )
    assert_error(refused, 403, "permission_error", code="model_not_allowed")
    assert claude.calls == []


def test_an_unknown_or_disabled_model_is_a_404(live):
    assert_error(get(live, "models/gpt-9"), 404, "invalid_request_error", code="model_not_found")
    LanguageModel.objects.filter(name="gpt-4o").update(is_enabled=False)
    assert get(live, "models").json()["data"] == []
    assert_error(get(live, "models/gpt-4o"), 404, "invalid_request_error", code="model_not_found")


def test_the_sdk_lists_and_retrieves_models(live, claude):
    assert [model.id for model in live.sdk.models.list()] == ["claude-sonnet-4", "gpt-4o"]
    assert live.sdk.models.retrieve("claude-sonnet-4").id == "claude-sonnet-4"
    with pytest.raises(openai.NotFoundError):
        live.sdk.models.retrieve("gpt-9")


def test_the_models_need_a_valid_key(live):
    for path in ("models", "models/gpt-4o"):
        response = httpx.get(f"{live.url}/v1/{path}")
        assert_error(response, 401, "invalid_api_key", code="invalid_api_key")
        response = get(live, path, key=UNKNOWN_KEY)
        assert_error(response, 401, "invalid_api_key", code="invalid_api_key")


def test_a_wrong_method_on_the_models_is_a_405(live):
    response = httpx.post(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {live.key}"})
    assert_error(response, 405, "invalid_request_error", code="method_not_allowed")
