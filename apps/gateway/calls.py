"""One completion call, from the key's policy to settlement.

The view parses and answers; this module decides: which model and channels, how much to
hold, how to fail over, what to bill. The hold and the settlement are async services
(one statement on the event loop's connection when they can be); any other database step is
one sync function run in a worker thread (`db_step`), because a transaction cannot span
async code.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from apps.billing.models import Hold
from apps.billing.money import format_usd
from apps.billing.services import (
    CallQuote,
    InsufficientFunds,
    KeyBudget,
    PendingHold,
    hold_release,
    hold_start_for_call,
)
from apps.catalog.selectors import ChannelRoute, Route, callable_models, route_for_model
from apps.gateway import metrics
from apps.gateway.errors import (
    GatewayError,
    InsufficientQuota,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceBusy,
    UpstreamBadGateway,
    UpstreamOverloaded,
    UpstreamRefused,
    UpstreamTimeout,
)
from apps.gateway.providers import get_provider
from apps.gateway.providers.base import (
    ChatRequest,
    Completion,
    StreamEvent,
    Upstream,
    UpstreamError,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnavailable,
    Usage,
    UsageEvent,
    output_text,
)
from apps.gateway.tokens import count_prompt_tokens, count_text_tokens, encoding_ready
from apps.gateway.validation import ValidRequest
from apps.keys.limits import (
    Admission,
    LimitExceeded,
    PendingAdmission,
    call_admit,
    call_admit_start,
    refused_lately,
    tokens_correct,
)
from apps.keys.selectors import KeyGrant
from apps.usage.models import EndReason, UsageSource
from apps.usage.services import CallOutcome, call_settle_async
from apps.usage.tasks import settle_call
from config.asyncdb import db_step

logger = logging.getLogger(__name__)

# Each random byte picks a letter or a digit. 256 is not a multiple of 62, so eight of
# them come up slightly more often: an id must be unique, not uniformly distributed.
_ID_TABLE = bytes((string.ascii_letters + string.digits).encode()[i % 62] for i in range(256))
# Counting a long prompt takes a millisecond or more of CPU: past this size (or before the
# vocabulary is loaded) it runs in a worker thread so the event loop keeps serving other
# streams.
_OFF_LOOP_PROMPT_CHARS = 20_000


def new_call_id() -> str:
    # One read of the system's randomness, not one per character (29 system calls, 1.6 %
    # of the event loop's time under load).
    return "chatcmpl-" + secrets.token_bytes(29).translate(_ID_TABLE).decode()


@dataclass
class Call:
    """The state of one call while it runs; what settlement is computed from."""

    id: str
    grant: KeyGrant
    request: ValidRequest
    route: Route
    channels: list[ChannelRoute]
    prompt_tokens: int
    max_tokens: int
    hold: Hold
    admission: Admission
    started: float  # time.monotonic() when the request arrived: latency and TTFT count from it
    created: int = field(default_factory=lambda: int(time.time()))
    channel: ChannelRoute | None = None
    accepted: bool = False  # the upstream accepted the request: it may bill us
    answered: bool = False  # the upstream's whole non-streamed answer is in
    client_left: bool = False  # our client went away before its answer was in
    first_token_at: float | None = None
    generated: list[str] = field(default_factory=list)  # text delivered, for local counting
    usage: Usage | None = None  # the upstream's own count, last value wins
    end_reason: str = EndReason.DONE
    status_code: int = 200
    settled: bool = False
    billed: Usage | None = None  # what billed_usage decided, once the answer was complete

    @property
    def deadline(self) -> float:
        """When the call has run the longest a call may (time.monotonic())."""
        return self.started + settings.GATEWAY_MAX_CALL_SECONDS

    @property
    def usage_is_final(self) -> bool:
        """The upstream's usage counts the whole answer: the stream ran to its end, or the
        whole non-streamed answer came back (to a client that may have left meanwhile)."""
        return self.usage is not None and (self.end_reason == EndReason.DONE or self.answered)

    @property
    def chat(self) -> ChatRequest:
        body = dict(self.request.body)
        body[self.request.max_tokens_field] = self.max_tokens
        return ChatRequest(body=body, max_tokens=self.max_tokens)

    def upstream(self, channel: ChannelRoute) -> Upstream:
        return Upstream(
            base_url=channel.base_url,
            api_key=channel.api_key,
            model=channel.upstream_model,
            connect_timeout=settings.GATEWAY_CONNECT_TIMEOUT,
            first_byte_timeout=channel.timeout_seconds,
            chunk_timeout=channel.timeout_seconds,
            supports_stream_usage=channel.settings.get("stream_usage", True),
            settings=channel.settings,
        )


# --- Before the upstream ------------------------------------------------------------------


def check_key(grant: KeyGrant, client_ip: str) -> None:
    """The rules of the key itself, which every /v1 endpoint applies: a revoked or expired
    key, or one used from an address outside its list, may do nothing."""
    if grant.revoked:
        raise InvalidApiKey(f"The API key {grant.display} has been revoked.")
    if grant.is_expired(timezone.now()):
        raise InvalidApiKey(f"The API key {grant.display} has expired.")
    if not grant.allows_ip(client_ip):
        raise PermissionDenied(f"This key may not be used from {client_ip}.", code="ip_not_allowed")


def check_model(grant: KeyGrant, model: str) -> None:
    if not grant.allows_model(model):
        raise PermissionDenied(
            f"This key may not use the model '{model}'.", param="model", code="model_not_allowed"
        )


async def resolve_route(grant: KeyGrant, model: str) -> Route:
    route = await route_for_model(model)
    if route is None:
        # Counted against the key's requests per minute like any call, and refused with
        # 429 past them: a key that keeps asking for models that do not exist (each a
        # database lookup) is held to its limits too.
        try:
            await call_admit(grant, 0)
        except LimitExceeded as exceeded:
            raise rate_limited(exceeded) from None
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return route


async def estimate_prompt_tokens(request: ValidRequest) -> int:
    messages, tools = request.body["messages"], request.body.get("tools")
    prompt_chars = sum(len(str(m.get("content") or "")) for m in messages)
    if prompt_chars < _OFF_LOOP_PROMPT_CHARS and encoding_ready(request.model):
        return count_prompt_tokens(messages, request.model, tools)
    return await sync_to_async(count_prompt_tokens, thread_sensitive=False)(
        messages, request.model, tools
    )


def _hold_start(grant: KeyGrant, call_id: str, quote: CallQuote) -> PendingHold:
    return hold_start_for_call(
        organization_id=grant.organization_id,
        key=KeyBudget(key_id=grant.id, budget_nano=grant.budget_nano, period=grant.budget_period),
        request_id=call_id,
        expires_at=timezone.now() + timedelta(seconds=settings.GATEWAY_HOLD_SECONDS),
        quote=quote,
    )


def rate_limited(exceeded: LimitExceeded) -> RateLimited:
    return RateLimited(
        str(exceeded),
        headers={"Retry-After": str(exceeded.retry_after), **exceeded.admission.headers()},
    )


def _quota_error(refusal: InsufficientFunds, quote: CallQuote) -> InsufficientQuota:
    what = "your key's remaining budget" if refusal.limited_by == "budget" else "your balance"
    affordable = getattr(refusal, "affordable_tokens", None)
    if affordable is None:
        message = (
            f"This call needs up to ${format_usd(refusal.needed_nano, 6)}, more than "
            f"{what} of ${format_usd(refusal.available_nano, 6)}. Top up your balance."
        )
    elif affordable < max(quote.min_reply_tokens, 1):
        message = (
            f"{what.capitalize()} of ${format_usd(refusal.available_nano, 6)} does not cover "
            f"this prompt and a short reply (${format_usd(refusal.needed_nano, 6)}). "
            "Top up your balance."
        )
    else:
        message = (
            f"{what.capitalize()} of ${format_usd(refusal.available_nano, 6)} affords at most "
            f"{affordable} output tokens for this prompt; this call asks for up to "
            f"{quote.max_tokens} (${format_usd(refusal.needed_nano, 6)}). Lower max_tokens "
            "or top up your balance."
        )
    return InsufficientQuota(
        message,
        extra={
            "balance": format_usd(refusal.available_nano),
            "estimated_cost": format_usd(refusal.needed_nano),
            "affordable_max_tokens": affordable if affordable is not None else 0,
        },
    )


async def open_call(
    *, call_id: str, grant: KeyGrant, request: ValidRequest, started: float
) -> Call:
    """Policy, route, prompt estimate, rate limits and hold: everything that must hold
    before a byte goes upstream. Raises a GatewayError (and holds nothing) when the call
    may not go."""
    check_model(grant, request.model)
    route = await resolve_route(grant, request.model)
    if request.max_tokens is not None and request.max_tokens > route.max_output_tokens:
        raise InvalidRequest(
            f"'{request.max_tokens_field}' is too large: {request.max_tokens}. The model "
            f"'{request.model}' produces at most {route.max_output_tokens} output tokens.",
            param=request.max_tokens_field,
        )
    channels = route.channels_in_order()
    if request.n > 1:
        channels = [c for c in channels if c.kind == "openai"]
        if not channels:
            raise InvalidRequest(
                f"'n' greater than 1 is not supported for the model '{request.model}'.",
                param="n",
            )
    quote = CallQuote(
        prompt_tokens=await estimate_prompt_tokens(request),
        max_tokens=request.max_tokens,
        output_cap=route.max_output_tokens,
        n=request.n,
        rates=route.price,
        min_reply_tokens=settings.GATEWAY_MIN_REPLY_TOKENS,
    )
    admission, hold, max_tokens = await _admit_and_hold(grant, call_id, request.model, quote)
    return Call(
        id=call_id,
        grant=grant,
        request=request,
        route=route,
        channels=channels,
        prompt_tokens=quote.prompt_tokens,
        max_tokens=max_tokens,
        hold=hold,
        admission=admission,
        started=started,
    )


async def _admit_and_hold(
    grant: KeyGrant, call_id: str, model: str, quote: CallQuote
) -> tuple[Admission, Hold, int]:
    """The rate limits (Redis) and the hold (PostgreSQL), which must both pass before the
    upstream is called; when one refuses, what the other did is undone.

    The two are independent, so both are sent at once and their answers awaited in turn:
    under load each round trip waits for the event loop's passes, and the first token
    waited for both. The hold goes first: the statements leave in the order they were
    started, and PostgreSQL's answer is the slower (one process at 270 calls a second
    waited 2.8 ms for both instead of 3.4). Neither runs in a task of its own (each task
    costs a pass to start and another to report), and neither answer can be lost to a
    client who leaves meanwhile: what they took is then given back once they finish, in
    the background. A key refused for its limits in this window has its limits checked
    before any hold instead, so that a client that keeps sending past its limits gets its
    429s without a hold written and released for each.
    """
    placing: PendingHold | None = None
    admission: Admission | None = None
    try:
        # Both started inside the `try`: if the second start failed, the first's hold
        # would still be given back. Nothing awaits before `admitting` is set.
        if not refused_lately(grant):
            placing = _hold_start(grant, call_id, quote)
        admitting = call_admit_start(grant, quote.worst_case_tokens)
        admission = await admitting.admission()
        if placing is None:
            placing = _hold_start(grant, call_id, quote)
        hold, max_tokens = await placing.hold()
    except asyncio.CancelledError:
        _settle_in_background(_undo_abandoned(call_id, admitting, placing))
        raise
    except LimitExceeded as exceeded:
        await asyncio.shield(_undo_taken(None, placing))
        raise rate_limited(exceeded) from None
    except Exception as not_held:
        await asyncio.shield(_undo_taken(admission, placing))
        if admission is None:
            raise
        headers = admission.headers()
        if isinstance(not_held, InsufficientFunds):  # CallNotAffordable included
            metrics.REFUSED_FOR_QUOTA.labels(model=model).inc()
            refusal = _quota_error(not_held, quote)
            refusal.headers.update(headers)
            raise refusal from None
        if isinstance(not_held, DatabaseError):
            # Overload (the pool had no connection to give in time) or a database blip
            # before anything was held or sent: the customer may simply retry.
            logger.error("call %s: the database did not answer in time", call_id, exc_info=True)
            raise ServiceBusy(
                "real200 is busy right now; nothing was charged. Please retry in a moment.",
                headers={"Retry-After": "1", **headers},
            ) from None
        raise
    return admission, hold, max_tokens


async def _undo_taken(admission: Admission | None, placing: PendingHold | None) -> None:
    """Give back what the steps of a call that does not run took: the tokens reserved for
    it, its hold (once its steps have finished). A hold that cannot be released now (the
    database is failing) is logged and left to expire: it only reserves money, and the
    customer still gets the answer that refused the call."""
    if admission is not None:
        await tokens_correct(admission, 0)  # fails open, logged
    hold = await placing.taken() if placing is not None else None
    if hold is None:
        return
    try:
        await db_step(hold_release, hold=hold)
    except DatabaseError:
        logger.exception(
            "call %s: its hold could not be released; it expires at %s",
            hold.request_id,
            hold.expires_at.isoformat(),
        )


async def _undo_abandoned(
    call_id: str, admitting: PendingAdmission, placing: PendingHold | None
) -> None:
    """`_undo_taken` for a call whose client left while it was admitted: once its steps
    finish, not when the hold expires."""
    await _undo_taken(await admitting.reserved(), placing)
    logger.info("call %s: the client left before the call began; what it took is back", call_id)


# --- Upstream ----------------------------------------------------------------------------

_clients: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def upstream_client() -> aiohttp.ClientSession:
    """One pooled client per event loop (one per worker process in production)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        for stale in [old for old in _clients if old.is_closed()]:
            del _clients[stale]
        client = _clients[loop] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.GATEWAY_UPSTREAM_CONNECTIONS, limit_per_host=0
            ),
            trust_env=False,  # upstreams are called directly, never through an env proxy
        )
    return client


async def upstream_clients_close() -> None:
    """Close this event loop's upstream client (at the server's shutdown)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.close()


def _all_failed(errors: list[UpstreamError], model: str) -> GatewayError:
    if errors and all(getattr(e, "timeout", False) for e in errors):
        return UpstreamTimeout(f"Every upstream for '{model}' timed out. Please retry.")
    if errors and all(e.status == 429 for e in errors):
        return UpstreamOverloaded(f"Every upstream for '{model}' is overloaded. Please retry.")
    return UpstreamBadGateway(f"Every upstream for '{model}' failed. Please retry.")


def _rejected(error: UpstreamRejected) -> GatewayError:
    message = str(error) or "The upstream provider rejected the request."
    return UpstreamRefused(message, status=error.status or 400)


def upstream_failure(call: Call, error: UpstreamFailed) -> GatewayError:
    """The upstream broke after accepting the call: never retried (it may bill us)."""
    if call.channel is not None:
        metrics.UPSTREAM_ERRORS.labels(channel=call.channel.name, kind="failed").inc()
    call.end_reason = EndReason.TIMEOUT if error.timeout else EndReason.UPSTREAM_ERROR
    if error.timeout:
        return UpstreamTimeout("The upstream provider stopped answering. Please retry.")
    return UpstreamBadGateway("The upstream provider failed while answering. Please retry.")


def broken(call: Call, error: Exception) -> GatewayError:
    """A call that failed on an error of real200's own, a bug: logged with its trace, it
    ends as an upstream error, billed for what was delivered, and the customer gets the
    generic 500 instead of a connection cut without a word."""
    logger.error("call %s failed", call.id, exc_info=error)
    call.end_reason = EndReason.UPSTREAM_ERROR
    call.status_code = 500
    return GatewayError(
        f"The server had an error while processing your request (request id {call.id}). "
        "Please retry; contact support if it persists."
    )


def past_deadline(call: Call) -> UpstreamTimeout:
    """The call ran past GATEWAY_MAX_CALL_SECONDS (`Call.deadline`): it ends as a timeout,
    billed for what was delivered."""
    call.end_reason = EndReason.TIMEOUT
    return UpstreamTimeout("The call ran past the longest time a call may take.")


def _note_unavailable(call: Call, channel: ChannelRoute, error: UpstreamUnavailable) -> None:
    metrics.UPSTREAM_ERRORS.labels(channel=channel.name, kind="unavailable").inc()
    logger.warning("call %s: channel %s unavailable: %s", call.id, channel.name, error)


async def complete(call: Call) -> Completion:
    """Forward a non-streamed call, trying the next channel only while nothing can have
    been processed upstream."""
    errors: list[UpstreamError] = []
    for channel in call.channels:
        if call.client_left:
            break  # nobody is waiting for an answer: no new upstream call
        call.channel = channel
        try:
            # An upstream that keeps its connection alive (servers that send whitespace
            # while a long answer is made) would otherwise outlive the call's hold.
            async with asyncio.timeout(call.deadline - time.monotonic()):
                completion = await get_provider(channel.kind).complete(
                    call.chat, call.upstream(channel), upstream_client()
                )
        except TimeoutError:
            call.accepted = True  # it may have been processed: nothing more is tried
            error = past_deadline(call)
            call.status_code = error.status
            raise error from None
        except UpstreamUnavailable as error:
            _note_unavailable(call, channel, error)
            errors.append(error)
            continue
        except UpstreamRejected as error:
            call.status_code = error.status or 400
            call.end_reason = EndReason.UPSTREAM_ERROR
            raise _rejected(error) from None
        except UpstreamFailed as error:
            call.accepted = True
            failure = upstream_failure(call, error)
            call.status_code = failure.status
            raise failure from None
        call.accepted = call.answered = True
        call.first_token_at = time.monotonic()
        call.usage = completion.usage
        if completion.usage is None:
            call.generated.extend(_completion_texts(completion.response))
        return completion
    call.end_reason = EndReason.UPSTREAM_ERROR
    error = _all_failed(errors, call.request.model)
    call.status_code = error.status
    raise error


def _completion_texts(response: dict[str, Any]) -> list[str]:
    texts = []
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        texts.append(output_text(message))
        for tool_call in message.get("tool_calls") or []:
            function = tool_call.get("function") or {}
            texts.append(function.get("name", "") + function.get("arguments", ""))
    return texts


async def open_stream(call: Call) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """Start a streamed call and wait for its first event, failing over until one
    channel answers. Nothing has reached the client yet, so a failure here can still be
    an ordinary HTTP error."""
    errors: list[UpstreamError] = []
    for channel in call.channels:
        call.channel = channel
        events = get_provider(channel.kind).stream(
            call.chat, call.upstream(channel), upstream_client()
        )
        try:
            first = await anext(events)
        except UpstreamUnavailable as error:
            await events.aclose()
            _note_unavailable(call, channel, error)
            errors.append(error)
            continue
        except UpstreamRejected as error:
            await events.aclose()
            call.status_code = error.status or 400
            call.end_reason = EndReason.UPSTREAM_ERROR
            raise _rejected(error) from None
        except (UpstreamFailed, StopAsyncIteration) as error:
            await events.aclose()
            call.accepted = True
            if isinstance(error, StopAsyncIteration):
                error = UpstreamFailed("the upstream closed the stream without an event")
            failure = upstream_failure(call, error)
            call.status_code = failure.status
            raise failure from None
        call.accepted = True
        return first, events
    call.end_reason = EndReason.UPSTREAM_ERROR
    error = _all_failed(errors, call.request.model)
    call.status_code = error.status
    raise error


# --- Shapes sent to the customer -----------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return body


def completion_body(call: Call, completion: Completion) -> dict[str, Any]:
    """The `chat.completion` object: real200's id, the model name the customer asked for."""
    choices = completion.response.get("choices") or []
    for index, choice in enumerate(choices):
        choice.setdefault("index", index)
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", "stop")
        message = choice["message"] = choice.get("message") or {}
        message.setdefault("role", "assistant")
        message.setdefault("content", None)
        message.setdefault("refusal", None)
    body = {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.request.model,
        "choices": choices,
        "usage": usage_body(billed_usage(call)),
    }
    if completion.response.get("system_fingerprint"):
        body["system_fingerprint"] = completion.response["system_fingerprint"]
    return body


def note_produced(call: Call, event: StreamEvent) -> None:
    """What a stream's event tells the bill: text the upstream produced, or its usage."""
    if isinstance(event, UsageEvent):
        call.usage = event.usage
    elif event.text:
        call.generated.append(event.text)


class StreamWriter:
    """Turns adapter events into the customer's SSE bytes, and records what was sent."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._head = (
            b'{"id":"'
            + call.id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(call.created).encode()
            + b',"model":'
            + orjson.dumps(call.request.model)
        )

    def event(self, event: StreamEvent) -> bytes | None:
        note_produced(self.call, event)
        if isinstance(event, UsageEvent):
            return None
        if self.call.first_token_at is None:
            self.call.first_token_at = time.monotonic()
        for index, choice in enumerate(event.choices):
            choice.setdefault("index", index)
            choice.setdefault("finish_reason", None)
        tail = b',"choices":' + orjson.dumps(event.choices)
        if event.system_fingerprint:
            tail += b',"system_fingerprint":' + orjson.dumps(event.system_fingerprint)
        if self.call.request.include_usage:
            tail += b',"usage":null'
        return b"data: " + self._head + tail + b"}\n\n"

    def usage_chunk(self) -> bytes:
        usage = orjson.dumps(usage_body(billed_usage(self.call)))
        return b"data: " + self._head + b',"choices":[],"usage":' + usage + b"}\n\n"


DONE = b"data: [DONE]\n\n"


# --- Settlement ---------------------------------------------------------------------------


def billed_usage(call: Call) -> Usage:
    """What the call is billed for: the upstream's own count when it gave one and the
    call ran to its end; otherwise our count of what was delivered.

    Asked once the answer is complete (its usage body, then settlement), it is computed
    once: local counting is the tokenizer's work, and the figure shown is the one charged.
    A call cut short before that point is computed at settlement, from what it delivered.

    Never more output than `max_tokens` allows, whoever counted: the customer capped the
    call there, and the hold covers no more (an upstream may count past the cap, e.g. a
    tool call's arguments beyond it).
    Nothing is billed for a call that delivered no output because the upstream failed:
    error text is never output.
    """
    if call.billed is None:
        call.billed = _billed_usage(call)
    return call.billed


def _billed_usage(call: Call) -> Usage:
    if call.usage_is_final:
        allowed = call.max_tokens * call.request.n
        if call.usage.completion_tokens > allowed:
            return replace(call.usage, completion_tokens=allowed)
        return call.usage
    if not call.accepted:
        return Usage(prompt_tokens=0, completion_tokens=0)
    text = "".join(call.generated)
    if not text and call.end_reason in (EndReason.UPSTREAM_ERROR, EndReason.TIMEOUT):
        return Usage(prompt_tokens=0, completion_tokens=0)
    completion = min(count_text_tokens(text, call.request.model), call.max_tokens * call.request.n)
    if call.usage is not None:  # a partial count from the upstream (cumulative): trust the larger
        completion = max(
            completion, min(call.usage.completion_tokens, call.max_tokens * call.request.n)
        )
        return Usage(
            prompt_tokens=call.usage.prompt_tokens or call.prompt_tokens,
            completion_tokens=completion,
            cached_tokens=call.usage.cached_tokens,
            cache_write_tokens=call.usage.cache_write_tokens,
        )
    return Usage(prompt_tokens=call.prompt_tokens, completion_tokens=completion)


def _outcome(call: Call, usage: Usage) -> CallOutcome:
    now = time.monotonic()
    return CallOutcome(
        request_id=call.id,
        organization_id=call.grant.organization_id,
        api_key_id=call.grant.id,
        model=call.request.model,
        price_id=call.route.price.id,
        channel_id=call.channel.id if call.channel else None,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        completion_tokens=usage.completion_tokens,
        usage_source=UsageSource.UPSTREAM if call.usage_is_final else UsageSource.ESTIMATED,
        end_reason=call.end_reason,
        status_code=call.status_code,
        is_stream=call.request.stream,
        latency_ms=int((now - call.started) * 1000),
        ttft_ms=int((call.first_token_at - call.started) * 1000) if call.first_token_at else None,
    )


async def settle(call: Call) -> None:
    """Settle exactly once, whatever happened. Shielded by the callers, so a client that
    disconnects cannot cancel it halfway."""
    if call.settled:
        return
    call.settled = True
    usage = billed_usage(call)
    outcome = _outcome(call, usage)
    # The rate limiter's correction (Redis) and the books (PostgreSQL) are independent:
    # both at once, so the call waits for the slower only.
    _corrected, record = await asyncio.gather(
        tokens_correct(call.admission, outcome.prompt_tokens + outcome.completion_tokens),
        call_settle_async(hold=call.hold, outcome=outcome, rates=call.route.price),
        return_exceptions=True,
    )
    if isinstance(record, BaseException):
        logger.error("call %s: settlement failed; a task will finish it", call.id, exc_info=record)
        await _settle_later(call, outcome)
        return
    metrics.observe_call(outcome, record.charged_nano if record else 0)


# Settlements that outlive their response, and the undoing of what a call whose client
# left before it began took: asyncio keeps only weak references to tasks, so they are
# kept here until done (and waited for at shutdown).
_late_settlements: set[asyncio.Task] = set()


def _settle_in_background(settling: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(settling)
    _late_settlements.add(task)
    task.add_done_callback(_late_settlements.discard)


def settle_after_stream(call: Call, events: AsyncIterator[StreamEvent]) -> None:
    """Close the upstream's stream and settle the call in a task of its own, so that the
    customer's response ends with its last event instead of after a round trip to the
    books (several under load). The task starts at once: the upstream hears no later than
    the next turn of the event loop that nobody listens any more."""
    _settle_in_background(_close_and_settle(call, events))


async def _close_and_settle(call: Call, events: AsyncIterator[StreamEvent]) -> None:
    try:
        if call.end_reason in (EndReason.CLIENT_GONE, EndReason.TIMEOUT):
            await _take_what_arrived(call, events)
    finally:
        try:
            await events.aclose()
        finally:
            await settle(call)


async def _take_what_arrived(call: Call, events: AsyncIterator[StreamEvent]) -> None:
    """Note the events of a stream cut short that had reached real200 but not its client.

    A relay reads the upstream no faster than its client reads it: while a write to a
    client that stopped reading waits, what the upstream goes on producing collects in
    real200's buffers. The upstream produced it and bills it, so it is billed too. Each
    event is taken only if it is there already: a step that would wait for the network is
    cancelled, which closes the upstream's stream (at once, as for any client that left).
    A stream whose relay was cancelled while it waited for the upstream is closed
    already, with nothing waiting: then there is nothing to take.
    """
    for _ in range(call.max_tokens * call.request.n + 64):  # a bound, should it flood
        # A task's first step runs in the next turn of the loop, before this one resumes:
        # an event that is there is taken in it; one that is not leaves it waiting.
        step = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        if not step.done():
            step.cancel()
            await asyncio.wait([step])
            return
        if step.cancelled() or step.exception() is not None:
            return  # the stream's end, or its failure: nothing more arrived
        note_produced(call, step.result())


def settle_when_answered(call: Call, answering: asyncio.Future[Completion]) -> None:
    """Our client left a non-streamed call while the upstream was answering it.

    A non-streamed answer's usage is known only at its end, and hosted upstreams bill a
    call in full whether or not its caller stays: closing the upstream call would make it
    free to the customer and a loss to the operator (and a way to have the operator pay
    for answers nobody is charged for). So the upstream call goes on, in a task of its
    own, and what it reports is billed, with the end reason `client_gone`. No other
    channel is tried for a client that has left."""
    call.client_left = True
    _settle_in_background(_settle_when_answered(call, answering))


async def _settle_when_answered(call: Call, answering: asyncio.Future[Completion]) -> None:
    try:
        await answering
    except GatewayError:
        pass  # the upstream failed: `complete` noted how, and nothing is billed for it
    except Exception:  # a bug, logged; the call is still settled on what it knows
        logger.exception("call %s: the upstream call failed after the client left", call.id)
    else:
        call.end_reason = EndReason.CLIENT_GONE
    call.status_code = 499  # after `complete`, which sets the status of a failure
    await settle(call)


async def late_settlements_finish() -> None:
    """Wait for this event loop's settlements still running: at the server's shutdown,
    before the pools they use are closed, so that none goes unbilled."""
    loop = asyncio.get_running_loop()
    while running := [task for task in _late_settlements if task.get_loop() is loop]:
        await asyncio.wait(running)


async def _settle_later(call: Call, outcome: CallOutcome) -> None:
    """Hand the metered outcome to the books worker: the hold (written before the upstream
    was called) stays open until the task settles it, exactly once."""
    try:
        await sync_to_async(settle_call.delay, thread_sensitive=False)(
            call.hold.pk, asdict(outcome)
        )
    except Exception:
        # Neither the database nor the broker took it: the hold will expire and be
        # released, and this call goes unbilled. Say so loudly.
        logger.exception("call %s: could not queue its settlement; it will go unbilled", call.id)


def _models_for_key(grant: KeyGrant) -> list[dict[str, Any]]:
    return [
        {"id": model.name, "object": "model", "created": model.created, "owned_by": model.owned_by}
        for model in callable_models()
        if grant.allows_model(model.name)
    ]


async def models_for_key(grant: KeyGrant) -> list[dict[str, Any]]:
    """The models this key may call, in OpenAI's model shape."""
    return await db_step(_models_for_key, grant)
