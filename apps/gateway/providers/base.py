"""The one small interface every provider adapter implements.

An adapter translates one OpenAI-shaped chat request into its upstream's protocol and
translates the answer back into OpenAI's shapes. It imports nothing of ours but this
module: no database, no ledger, no settings. Everything it needs arrives as arguments.

Errors are split by what they mean for failover, because retrying a call that an
upstream may already have processed is how relays bill twice:

- ``UpstreamUnavailable``: nothing was processed (connect error, a 5xx or 429 status, a
  401/403/404/408 that blames the channel rather than the request, no response headers
  within the first-byte timeout). The gateway may try the next channel, provided nothing
  has reached the client yet.
- ``UpstreamFailed``: the upstream accepted the request and then broke (a read timeout
  between chunks, a dropped connection, a malformed body). Never retried.
- ``UpstreamRejected``: the upstream refused the request itself (any other 4xx);
  retrying elsewhere would fail the same way, so the status is passed to the customer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call, normalised to OpenAI's meaning.

    ``prompt_tokens`` counts every prompt token, cached or not (OpenAI's definition);
    ``cached_tokens`` is the part of it read from a prompt cache and
    ``cache_write_tokens`` the part written to one (priced apart: Anthropic charges more
    for a write than for plain input; OpenAI-compatible upstreams report none). An
    adapter whose upstream counts differently (Anthropic's ``input_tokens`` excludes
    cache reads and writes) converts here, so nothing downstream can count a token twice.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def reported(
        cls, *, prompt: object, completion: object, cached: object = 0, cache_write: object = 0
    ) -> Usage | None:
        """An upstream's counts as its JSON gave them, made fit to bill, or None if they
        are no count at all. The prompt and completion counts must be whole non-negative
        numbers (12 or 12.0): a server that sends null, "12" or -1 gave none, and the call
        is billed on real200's own count instead. Cache reads and writes are cut to fit
        inside the prompt (an unusable one is 0: those tokens are billed as plain input).
        Either way a settlement never fails on them, nor gets a float into money."""
        prompt_tokens, completion_tokens = token_count(prompt), token_count(completion)
        if prompt_tokens is None or completion_tokens is None:
            return None
        cached_tokens = min(token_count(cached) or 0, prompt_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            cache_write_tokens=min(token_count(cache_write) or 0, prompt_tokens - cached_tokens),
        )


def token_count(value: object) -> int | None:
    """A count from an upstream's JSON as an int, if it is a whole non-negative number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how to reach one channel, as the gateway resolved it for this call."""

    base_url: str
    api_key: str
    model: str  # the upstream's name for the model (the channel's mapping applied)
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0  # until the response headers arrive
    chunk_timeout: float = 60.0  # between two chunks of a stream (or of a body)
    supports_stream_usage: bool = True  # accepts stream_options.include_usage
    settings: dict[str, Any] = field(default_factory=dict)  # adapter-specific (demo pace)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat request, as the customer sent it.

    ``body`` is the OpenAI request body after validation (unknown fields dropped), with
    ``max_tokens`` resolved: the gateway always sets it, because the hold placed before the
    call covers exactly that many output tokens. ``body["model"]`` is the customer's name;
    adapters send ``Upstream.model`` instead.
    """

    body: dict[str, Any]
    max_tokens: int

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer in OpenAI's ``chat.completion`` shape.

    ``response`` carries ``choices`` (and ``system_fingerprint`` where the upstream gave
    one); the gateway sets ``id``, ``model``, ``created`` and ``usage`` itself.
    ``usage`` is None when the upstream reported none (the gateway then counts locally).
    """

    response: dict[str, Any]
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    """One stream chunk's ``choices`` list, in OpenAI's chunk shape, forwarded as it came.

    ``text`` is the generated text in this chunk (content, refusal and tool-call
    arguments), so the gateway can count tokens locally if the upstream never reports
    usage.
    """

    choices: list[dict[str, Any]]
    text: str = ""
    system_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """The usage of the call so far. May come more than once; the last one counts."""

    usage: Usage


StreamEvent = ChunkEvent | UsageEvent


# The fields of a message, or of a stream's delta, whose text is output the upstream
# bills: the answer, a refusal, and the reasoning that models such as DeepSeek's R1 or
# Qwen's QwQ show before it (`reasoning_content`; `reasoning` on OpenRouter and newer vLLM).
TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")


def output_text(part: dict[str, Any]) -> str:
    """The output text of a message or a delta, tool calls aside. A server that sends
    both reasoning fields sends the same text twice: it is counted once."""
    reasoning = part.get("reasoning_content") or part.get("reasoning")
    return "".join(
        value if isinstance(value, str) else ""
        for value in (part.get("content"), part.get("refusal"), reasoning)
    )


class UpstreamError(Exception):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamUnavailable(UpstreamError):
    """Nothing was processed: the next channel may be tried."""

    def __init__(self, message: str, *, status: int | None = None, timeout: bool = False):
        super().__init__(message, status=status)
        self.timeout = timeout


class UpstreamFailed(UpstreamError):
    """The upstream may have processed the request: never retried."""

    def __init__(self, message: str, *, status: int | None = None, timeout: bool = False):
        super().__init__(message, status=status)
        self.timeout = timeout


class UpstreamRejected(UpstreamError):
    """The upstream refused the request (a 4xx that does not blame the channel); ``body`` is
    its error in OpenAI's shape."""

    def __init__(self, message: str, *, status: int, body: dict[str, Any] | None = None):
        super().__init__(message, status=status)
        self.body = body


class Provider(Protocol):
    """What the gateway calls. One module per upstream kind implements it."""

    async def complete(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> Completion: ...

    def stream(
        self, request: ChatRequest, upstream: Upstream, client: aiohttp.ClientSession
    ) -> AsyncIterator[StreamEvent]:
        """Yield events as the upstream sends them; the last ChunkEvent carries the
        finish_reason. Closing the iterator (``aclose``) closes the upstream connection
        at once."""
        ...
