from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from apps.gateway.tokens import (
    count_prompt_tokens,
    count_text_tokens,
    encoding_name_for_model,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", 8),
        ("gpt-4", 14),
    ],
)
def test_chinese_sentence_counts_match_openai(model: str, expected: int) -> None:
    assert count_text_tokens("请用三句话介绍你自己。", model) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("claude-sonnet-4", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("GPT-4", "cl100k_base"),
    ],
)
def test_each_model_family_gets_its_encoding(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_text_that_spells_a_special_token_is_counted_not_refused() -> None:
    assert count_text_tokens("<|endoftext|>", "gpt-4o") > 1


def test_one_short_message_costs_what_openai_reports() -> None:
    # OpenAI reports 8 prompt tokens for this request to gpt-4o: 3 for the message,
    # "user" and "hello" one each, 3 to prime the reply.
    assert count_prompt_tokens([{"role": "user", "content": "hello"}], "gpt-4o") == 8


def test_every_message_adds_its_overhead_and_a_name_one_more() -> None:
    one = count_prompt_tokens([{"role": "user", "content": "hello"}], "gpt-4o")
    two = count_prompt_tokens(
        [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello"}], "gpt-4o"
    )
    named = count_prompt_tokens([{"role": "user", "content": "hello", "name": "ann"}], "gpt-4o")
    assert two == one + 3 + 2  # the overhead, "system" and "hello"
    assert named == one + count_text_tokens("ann", "gpt-4o") + 1


def test_text_parts_count_like_the_same_text_as_a_string() -> None:
    parts = [{"type": "text", "text": "Hello there, "}, {"type": "text", "text": "world."}]
    as_parts = count_prompt_tokens([{"role": "user", "content": parts}], "gpt-4o")
    as_text = count_prompt_tokens([{"role": "user", "content": "Hello there, world."}], "gpt-4o")
    assert abs(as_parts - as_text) <= 1  # the split may move one token boundary


def test_images_are_estimated_by_their_detail() -> None:
    def with_image(detail: str) -> int:
        image = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": detail}}
        return count_prompt_tokens([{"role": "user", "content": [image]}], "gpt-4o")

    text_only = count_prompt_tokens([{"role": "user", "content": []}], "gpt-4o")
    assert with_image("low") == text_only + 85
    assert with_image("high") == text_only + 765


def test_tool_calls_and_tool_definitions_are_counted() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    plain = [{"role": "assistant", "content": None}]
    with_call = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

    assert count_prompt_tokens(with_call, "gpt-4o") == count_prompt_tokens(
        plain, "gpt-4o"
    ) + count_text_tokens("f", "gpt-4o") + count_text_tokens('{"a":1}', "gpt-4o")
    assert count_prompt_tokens(plain, "gpt-4o", tools) == count_prompt_tokens(
        plain, "gpt-4o"
    ) + count_text_tokens(orjson.dumps(tools).decode(), "gpt-4o")


def test_counting_needs_no_network(tmp_path: Path) -> None:
    # A fresh process with an empty cache and every HTTP request sent to a closed port:
    # tiktoken would fail at once if it tried to download a vocabulary.
    script = (
        "from apps.gateway.tokens import count_text_tokens as c\n"
        "print(c('请用三句话介绍你自己。', 'gpt-4o'), c('请用三句话介绍你自己。', 'gpt-4'))\n"
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=60
    )

    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.split() == [b"8", b"14"]
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    assert (tmp_path / hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()).exists()
