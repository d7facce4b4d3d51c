"""The /v1 API: thin async views over apps.gateway.calls."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import orjson
from adrf.views import APIView
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from rest_framework import exceptions as drf_exceptions

from apps.gateway import calls, metrics
from apps.gateway.errors import (
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestTooLarge,
    ServiceBusy,
    sse_error_event,
)
from apps.gateway.providers.base import StreamEvent, UpstreamFailed
from apps.gateway.validation import validate_chat_request
from apps.keys.limits import unknown_key_note, unknown_keys_wait
from apps.keys.selectors import KEY_SHAPE, KeyGrant, KeyLookupRefused, key_authenticate
from apps.usage.models import EndReason

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str:
    """The caller's address; a trusted proxy's X-Forwarded-For is believed, no other."""
    remote = request.META.get("REMOTE_ADDR", "")
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if forwarded and remote in settings.TRUSTED_PROXIES:
        return forwarded.split(",")[-1].strip()
    return remote


async def authenticate(request: HttpRequest) -> KeyGrant:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Bearer sk-real200-…'."
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidApiKey("The Authorization header must be 'Bearer sk-real200-…'.")
    address = client_ip(request)
    wait = unknown_keys_wait(address)
    try:
        grant = await key_authenticate(token.strip(), look_up=wait is None)
    except KeyLookupRefused:
        raise RateLimited(
            f"Too many requests with unknown API keys from {address}. Check the key your "
            f"client sends; retry in {wait} s.",
            code="too_many_unknown_keys",
            headers={"Retry-After": str(wait)},
        ) from None
    if grant is None:
        # Only a well-formed key can cost a lookup; a malformed one (another provider's
        # key, a truncated paste) is refused for free and not held against the address.
        if KEY_SHAPE.match(token.strip()):
            await unknown_key_note(address)
        raise InvalidApiKey("Incorrect API key provided. Find your keys in the dashboard.")
    # A revoked or expired key, or one used from outside its address list, may do nothing,
    # whatever the body says: these come before any validation of the request.
    calls.check_key(grant, address)
    return grant


class OpenAIView(APIView):
    """Base of every /v1 view: no DRF auth or parsing (the gateway does its own, once),
    every error in OpenAI's shape, and an `x-request-id` on every answer."""

    authentication_classes: list = []
    permission_classes: list = []
    throttle_classes: list = []
    metadata_class = None  # OPTIONS is not part of OpenAI's API: 405, like any other method

    rate_headers: dict[str, str] = {}

    async def async_dispatch(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        """adrf's dispatch less its call of `initial` (DRF's negotiation, authentication,
        permissions and throttles, none of which this API uses) in a worker thread: a
        hop to a thread and back on every request, which under load waited for the GIL
        behind the event loop."""
        self.args, self.kwargs = args, kwargs
        self.request = self.initialize_request(request, *args, **kwargs)
        self.headers = self.default_response_headers
        self.request_id = "req_" + secrets.token_hex(12)
        method = self.request.method.lower()
        try:
            if method not in self.http_method_names or not hasattr(self, method):
                self.http_method_not_allowed(self.request)  # raises
            response = await getattr(self, method)(self.request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(self.request, response, *args, **kwargs)
        return self.response

    def handle_exception(self, exc: Exception) -> HttpResponse:
        if isinstance(exc, GatewayError):
            return exc.response()
        if isinstance(exc, drf_exceptions.MethodNotAllowed):
            return MethodNotAllowed(
                f"Method {self.request.method} is not allowed on {self.request.path}."
            ).response()
        if isinstance(exc, DatabaseError):  # overload or a blip: nothing was charged
            logger.exception("request %s: the database did not answer", self.request_id)
            return ServiceBusy(
                "real200 is busy right now; nothing was charged. Please retry in a moment.",
                headers={"Retry-After": "1"},
            ).response()
        logger.exception("request %s failed", self.request_id)
        return GatewayError(
            f"The server had an error while processing your request (request id "
            f"{self.request_id}). Please retry; contact support if it persists."
        ).response()

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        response["x-request-id"] = self.request_id
        for name, value in self.rate_headers.items():
            response.headers.setdefault(name, value)
        return response


class ChatCompletionsView(OpenAIView):
    async def post(self, request, *args, **kwargs) -> HttpResponse:
        self.request_id = calls.new_call_id()
        started = time.monotonic()
        model = ""
        try:
            raw = _read_body(request._request)
            grant = await authenticate(request._request)
            valid = validate_chat_request(_parse_json(raw))
            model = valid.model
            call = await calls.open_call(
                call_id=self.request_id, grant=grant, request=valid, started=started
            )
            self.rate_headers = call.admission.headers()
            response = await (_stream(call) if valid.stream else _complete(call))
        except GatewayError as error:
            metrics.REQUESTS.labels(model=model, status=str(error.status)).inc()
            return error.response()
        metrics.REQUESTS.labels(model=model, status="200").inc()
        return response


def _read_body(request: HttpRequest) -> bytes:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > limit:
            raise _too_large(limit)
        body = request.body
    except RequestDataTooBig:
        raise _too_large(limit) from None
    except ValueError:
        raise InvalidRequest("The Content-Length header is not a number.") from None
    if len(body) > limit:  # sent chunked, without a Content-Length to check beforehand
        raise _too_large(limit)
    return body


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than {limit // (1024 * 1024)} MiB. Send fewer or "
        "smaller messages."
    )


def _parse_json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "The request body is not valid JSON. Send a JSON object with "
            "'Content-Type: application/json'."
        ) from None


async def _open_stream(call: calls.Call) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """Start the upstream's stream. A failure before anything reached the client is
    settled (nothing is billed) and raised as the answer; a client that leaves meanwhile
    is settled too (the upstream is closed at once), then the cancellation goes on."""
    try:
        return await calls.open_stream(call)
    except GatewayError:
        await asyncio.shield(calls.settle(call))
        raise
    except asyncio.CancelledError:
        call.end_reason = EndReason.CLIENT_GONE
        call.status_code = 499
        await asyncio.shield(calls.settle(call))
        raise
    except Exception as error:
        raise await _settled_as_broken(call, error) from error


async def _settled_as_broken(call: calls.Call, error: Exception) -> GatewayError:
    """A call that failed on an error of our own (`calls.broken`), settled; the answer to
    raise."""
    failure = calls.broken(call, error)
    await asyncio.shield(calls.settle(call))
    return failure


async def _complete(call: calls.Call) -> HttpResponse:
    # The upstream call runs in a task of its own: if our client leaves, it goes on
    # (the upstream bills us for it anyway) and is settled once answered.
    answering = asyncio.ensure_future(calls.complete(call))
    try:
        body = calls.completion_body(call, await asyncio.shield(answering))
    except GatewayError:
        await asyncio.shield(calls.settle(call))
        raise
    except asyncio.CancelledError:
        calls.settle_when_answered(call, answering)
        raise
    except Exception as error:
        raise await _settled_as_broken(call, error) from error
    await asyncio.shield(calls.settle(call))
    return HttpResponse(orjson.dumps(body), content_type="application/json")


class EventStream(StreamingHttpResponse):
    """A streamed body whose parts are bytes already: the ASGI handler iterates the relay
    itself, without the two generator layers and the type check per part that
    StreamingHttpResponse wraps around it (8 % of the CPU of relaying a chunk, measured),
    and sends each part as it is (config/asgi.py, `ApiHandler.send_response`)."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterator


class LastPart(bytes):
    """The last part of an event stream. The handler sends it as the end of the body, in
    the same write as HTTP's end-of-body marker, instead of a write of its own after it:
    one system call less per stream, and the client is woken once at the end, not twice."""


async def _stream(call: calls.Call) -> HttpResponse:
    first, events = await _open_stream(call)
    relay = _relay(call, first, events)
    # Step the relay into its `try` now: from here on, closing it settles the call, even
    # if its body is never iterated (the client left while the headers waited to go out,
    # and the ASGI handler closes the body it did not send).
    try:
        await anext(relay)
    except Exception as error:  # the first event could not be relayed: a bug of ours
        failure = calls.broken(call, error)
        calls.settle_after_stream(call, events)
        raise failure from error
    response = EventStream(relay, content_type="text/event-stream; charset=utf-8")
    # Proxies must pass each chunk on as it comes; compression would merge or break them.
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def _relay(
    call: calls.Call, first: StreamEvent, events: AsyncIterator[StreamEvent]
) -> AsyncIterator[bytes]:
    """The SSE body: each upstream chunk as it arrives, then usage if asked, then [DONE].

    Settlement starts in `finally`, in a task of its own: whether the stream ends, the
    upstream fails, or the client goes away (CancelledError at the current await), the
    call is billed exactly once, and the upstream connection is closed at once.
    """
    writer = calls.StreamWriter(call)
    deadline = call.deadline
    upstream_done = False
    chunk = writer.event(first)  # counted now: real200 has it, whether or not it is sent
    try:
        yield b""  # taken by `_stream`, never sent
        if chunk:
            yield chunk
        async for event in events:
            chunk = writer.event(event)
            if chunk:
                yield chunk
            if time.monotonic() > deadline:
                yield sse_error_event(calls.past_deadline(call))
                return
        # The answer is complete: a client that leaves during the last two events is not a
        # cut-short call, and is billed what the usage chunk (if asked for) told it.
        upstream_done = True
        # One write for the last two events: the client is woken once, not twice.
        yield LastPart(
            writer.usage_chunk() + calls.DONE if call.request.include_usage else calls.DONE
        )
    except UpstreamFailed as error:
        yield sse_error_event(calls.upstream_failure(call, error))
    except Exception as error:
        yield sse_error_event(calls.broken(call, error))
    except (asyncio.CancelledError, GeneratorExit):
        # Cancelled at an await of ours, or closed at a `yield` by the handler cancelled in
        # its write to the client: the client went away before the end, or the handler
        # ended a stream past its time (its client had stopped reading).
        if not upstream_done:
            overdue = time.monotonic() > deadline
            call.end_reason = EndReason.TIMEOUT if overdue else EndReason.CLIENT_GONE
        raise
    finally:
        calls.settle_after_stream(call, events)


class ModelListView(OpenAIView):
    async def get(self, request, *args, **kwargs) -> HttpResponse:
        try:
            grant = await authenticate(request._request)
        except GatewayError as error:
            return error.response()
        models = await calls.models_for_key(grant)
        body = {"object": "list", "data": models}
        return HttpResponse(orjson.dumps(body), content_type="application/json")


class ModelDetailView(OpenAIView):
    async def get(self, request, model_id: str, *args, **kwargs) -> HttpResponse:
        try:
            grant = await authenticate(request._request)
            for model in await calls.models_for_key(grant):
                if model["id"] == model_id:
                    return HttpResponse(orjson.dumps(model), content_type="application/json")
            raise NotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        except GatewayError as error:
            return error.response()


class UnknownEndpointView(OpenAIView):
    """Any other /v1 path: OpenAI's 404, not an HTML page."""

    async def _not_found(self, request, *args, **kwargs) -> HttpResponse:
        return NotFound(
            f"Unknown endpoint {request.method} {request.path}.", code="unknown_url"
        ).response()

    get = post = put = patch = delete = _not_found


async def metrics_view(request: HttpRequest) -> HttpResponse:
    payload, content_type = metrics.render()
    return HttpResponse(payload, content_type=content_type)
