"""OpenAI's answer shapes, for the adapters that build answers rather than pass them on.

Every field OpenAI's schema marks required is present (``refusal``, ``logprobs``, a
``finish_reason`` that stays null until the last chunk), so the gateway can forward them.
"""

from __future__ import annotations

from typing import Any

from apps.gateway.providers.base import ChunkEvent, FinishReason


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def choice(
    content: str, tool_calls: list[dict[str, Any]], finish_reason: FinishReason
) -> dict[str, Any]:
    """The one choice of a whole answer."""
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content beside tool calls, a string otherwise.
        "content": content if content or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}


def chunk(
    delta: dict[str, Any], *, text: str = "", finish_reason: FinishReason | None = None
) -> ChunkEvent:
    """A stream chunk of the one choice; ``text`` is what it adds to the answer."""
    return ChunkEvent(
        choices=[{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        text=text,
    )


def role_chunk() -> ChunkEvent:
    """The first chunk of a stream, as OpenAI sends it."""
    return chunk({"role": "assistant", "content": "", "refusal": None})


def finish_chunk(finish_reason: FinishReason) -> ChunkEvent:
    """The last chunk of a stream: an empty delta and the reason the answer ended."""
    return chunk({}, finish_reason=finish_reason)


def content_chunk(text: str) -> ChunkEvent:
    return chunk({"content": text}, text=text)


def tool_call_start_chunk(index: int, call_id: str, name: str) -> ChunkEvent:
    """Opens tool call ``index``; its arguments follow in ``arguments_chunk``s."""
    return chunk({"tool_calls": [{"index": index, **tool_call(call_id, name, "")}]}, text=name)


def arguments_chunk(index: int, fragment: str) -> ChunkEvent:
    return chunk(
        {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}, text=fragment
    )
