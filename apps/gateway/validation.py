"""Validation of a chat completion request against the contract in API.md.

Written as plain checks rather than DRF serializers: it runs on every call, the first bad
parameter must come back with OpenAI's `param` path (`messages[2].content`), and a
serializer costs about a millisecond of CPU per call here, a sixth of the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from apps.gateway.errors import InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_ONLY_ROLES = ("system", "developer", "tool")
USER_PART_TYPES = ("text", "image_url", "input_audio", "file")
ASSISTANT_PART_TYPES = ("text", "refusal")
TOOL_CHOICE_MODES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP_SEQUENCES = 4
MAX_N = 8

# Fields forwarded to the upstream. Anything else is ignored, as OpenAI ignores what it
# does not know, so an unknown field can never make an upstream refuse a billed call.
FORWARDED = frozenset(
    {
        "model", "messages", "temperature", "top_p", "stream", "stop",
        "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
        "seed", "n", "user", "logit_bias", "logprobs", "top_logprobs", "parallel_tool_calls",
        "stream_options", "reasoning_effort", "metadata", "service_tier", "verbosity",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ValidRequest:
    body: dict[str, Any]  # only FORWARDED fields, without the output limit (the gateway sets it)
    model: str
    max_tokens: int | None  # as asked; None when the customer left it to us
    max_tokens_field: str  # "max_tokens", or "max_completion_tokens" if that name was used
    n: int
    include_usage: bool  # the customer asked for the usage chunk

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_in(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise InvalidRequest(f"'{name}' must be a number.", param=name)
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}, got {value}.", param=name
        )


def _optional_int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"'{name}' must be {bound}, got {value}.", param=name)
    return value


def _optional_bool(body: dict, name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean (true or false).", param=name)


def _check_parts(parts: list, role: str, where: str) -> None:
    if not parts:
        raise InvalidRequest(f"'{where}' must not be an empty array.", param=where)
    allowed = (
        ("text",)
        if role in TEXT_ONLY_ROLES
        else ASSISTANT_PART_TYPES
        if role == "assistant"
        else USER_PART_TYPES
    )
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in allowed:
            raise InvalidRequest(
                f"'{at}' must be an object whose type is one of {', '.join(allowed)}.", param=at
            )
        kind = part["type"]
        if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
            raise InvalidRequest(f"'{at}.{kind}' must be a string.", param=f"{at}.{kind}")
        if "cache_control" in part and not isinstance(part["cache_control"], dict):
            raise InvalidRequest(
                f"'{at}.cache_control' must be an object.", param=f"{at}.cache_control"
            )
        image = part.get("image_url")
        if kind == "image_url" and not (
            isinstance(image, dict) and isinstance(image.get("url"), str)
        ):
            raise InvalidRequest(
                f"'{at}.image_url.url' must be a string.", param=f"{at}.image_url.url"
            )


def _check_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, list) or not tool_calls:
        raise InvalidRequest(f"'{where}' must be a non-empty array.", param=where)
    for j, call in enumerate(tool_calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call.get("id") if isinstance(call, dict) else None, str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise InvalidRequest(
                f"'{at}' must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}"
                " with string values.",
                param=at,
            )


def _check_message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}.",
            param=f"{where}.role",
        )
    content = message.get("content")
    has_tool_calls = role == "assistant" and message.get("tool_calls") is not None
    if has_tool_calls:
        _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if content is None:
        # OpenAI allows no content only on an assistant turn that called tools (or refused).
        if role != "assistant" or not (has_tool_calls or message.get("refusal")):
            raise InvalidRequest(f"'{where}.content' is required.", param=f"{where}.content")
    elif isinstance(content, list):
        _check_parts(content, role, f"{where}.content")
    elif not isinstance(content, str):
        raise InvalidRequest(
            f"'{where}.content' must be a string or an array of content parts.",
            param=f"{where}.content",
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(
            f"'{where}.tool_call_id' is required on a tool message.", param=f"{where}.tool_call_id"
        )
    if "name" in message and not isinstance(message["name"], str):
        raise InvalidRequest(f"'{where}.name' must be a string.", param=f"{where}.name")


def _check_messages(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is a required property.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, i)


def _check_stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) for s in stop)
    ):
        raise InvalidRequest(
            f"'stop' must be a string or an array of at most {MAX_STOP_SEQUENCES} strings.",
            param="stop",
        )


def _check_response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"'response_format.type' must be one of {', '.join(RESPONSE_FORMATS)}.",
            param="response_format.type" if isinstance(fmt, dict) else "response_format",
        )
    if fmt["type"] == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise InvalidRequest(
                "'response_format.json_schema' must be an object with a 'name'.",
                param="response_format.json_schema",
            )


def _check_tools(body: dict) -> set[str]:
    tools = body.get("tools")
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array of function tools.", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise InvalidRequest(
                f"'{at}' must be {{'type': 'function', 'function': {{'name', …}}}}.", param=at
            )
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise InvalidRequest(
                f"'{at}.function.name' must be 1-64 letters, digits, underscores or dashes.",
                param=f"{at}.function.name",
            )
        if "description" in function and not isinstance(function["description"], str):
            raise InvalidRequest(
                f"'{at}.function.description' must be a string.",
                param=f"{at}.function.description",
            )
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise InvalidRequest(
                f"'{at}.function.parameters' must be a JSON Schema object.",
                param=f"{at}.function.parameters",
            )
        names.add(name)
    return names


def _check_tool_choice(body: dict, tool_names: set[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None or choice in TOOL_CHOICE_MODES:
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise InvalidRequest(
            "'tool_choice' must be none, auto, required, or "
            "{'type': 'function', 'function': {'name': …}}.",
            param="tool_choice",
        )
    if function["name"] not in tool_names:
        raise InvalidRequest(
            f"'tool_choice' names function {function['name']!r}, which is not in 'tools'.",
            param="tool_choice",
        )


def _check_logit_bias(body: dict) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict) or not all(
        _is_number(v) and -100 <= v <= 100 for v in bias.values()
    ):
        raise InvalidRequest(
            "'logit_bias' must map token ids to numbers between -100 and 100.", param="logit_bias"
        )


def _check_stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if not body.get("stream"):
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be a boolean.",
            param="stream_options.include_usage",
        )
    return bool(include)


def validate_chat_request(body: Any) -> ValidRequest:
    """Check every parameter of the contract; the first bad one raises InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("'model' is a required property.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    _check_messages(body)
    _number_in(body, "temperature", 0, 2)
    _number_in(body, "top_p", 0, 1)
    _number_in(body, "presence_penalty", -2, 2)
    _number_in(body, "frequency_penalty", -2, 2)
    max_tokens = _optional_int(body, "max_tokens", 1)
    max_tokens_field = "max_tokens"
    newer = _optional_int(body, "max_completion_tokens", 1)
    if newer is not None:
        max_tokens, max_tokens_field = newer, "max_completion_tokens"
    _optional_bool(body, "stream")
    _check_stop(body)
    _check_response_format(body)
    _check_tool_choice(body, _check_tools(body))
    _optional_int(body, "seed", -(2**63), 2**63 - 1)
    n = _optional_int(body, "n", 1, MAX_N) or 1
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidRequest("'user' must be a string.", param="user")
    _check_logit_bias(body)
    _optional_bool(body, "logprobs")
    if _optional_int(body, "top_logprobs", 0, 20) is not None and not body.get("logprobs"):
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
    _optional_bool(body, "parallel_tool_calls")
    include_usage = _check_stream_options(body)
    return ValidRequest(
        body={name: value for name, value in body.items() if name in FORWARDED},
        model=model,
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        n=n,
        include_usage=include_usage,
    )
