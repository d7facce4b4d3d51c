"""POST /v1/chat/completions against a live real200, through the official openai SDK,
with real HTTP servers on 127.0.0.1 standing in for the upstream providers: whole
(non-streamed) answers, what reaches the upstream, and what is billed."""

from __future__ import annotations

import httpx
import orjson
import pytest

from apps.billing.models import Hold, HoldStatus
from apps.catalog.models import Channel
from apps.catalog.selectors import routes_forget
from apps.gateway.tokens import count_prompt_tokens, count_text_tokens
from apps.usage.models import EndReason, UsageSource
from tests.fakes import text_for
from tests.gateway.conftest import cost_of
from tests.openapi import assert_valid

pytestmark = pytest.mark.postgres

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


def test_a_non_streamed_call_is_openai_shaped_and_billed_exactly(live):
    before = live.balance_nano()
    live.upstream.configure(tokens=7, prompt_tokens=21, cached_tokens=5)
    raw = live.sdk.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "请用三句话介绍你自己。"}],
        max_tokens=50,
    )
    answer = raw.parse()
    body = raw.http_response.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["id"].startswith("chatcmpl-")
    assert raw.headers["x-request-id"] == body["id"]
    assert body["model"] == "gpt-4o"
    assert answer.choices[0].message.content == "The quick brown fox jumps over the"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (21, 7)
    assert answer.usage.total_tokens == 28
    assert answer.usage.prompt_tokens_details.cached_tokens == 5
    sent = live.upstream.calls[-1]
    assert sent.body["model"] == "gpt-4o-2024-08-06"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    (record,) = live.records()
    assert record.request_id == body["id"]
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (21, 5, 7)
    assert record.usage_source == UsageSource.UPSTREAM
    assert record.end_reason == EndReason.DONE
    assert not record.is_stream
    expected = 16 * 2_500 + 5 * 1_250 + 7 * 10_000
    assert record.cost_nano == record.charged_nano == expected == cost_of(record)
    assert live.balance_nano() == before - expected
    assert live.held_nano() == 0


def test_a_model_that_answers_only_as_a_stream_gets_its_whole_answer_billed(live):
    """A channel of stream-only models (`"stream_only": true` in its settings) is streamed
    upstream for a call that is not; the customer gets the whole answer, billed on the
    usage the stream reported."""
    Channel.objects.filter(name="primary").update(settings={"stream_only": True})
    routes_forget()
    live.upstream.configure(tokens=7, prompt_tokens=21, cached_tokens=5)
    before = live.balance_nano()
    response = live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50})
    assert response.status_code == 200
    body = response.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"] == text_for(7)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}
    assert live.upstream.calls[-1].body["stream"] is True
    (record,) = live.records()
    assert not record.is_stream
    assert record.usage_source == UsageSource.UPSTREAM
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (21, 5, 7)
    assert live.balance_nano() == before - record.charged_nano == before - cost_of(record)


def test_a_server_that_streams_what_was_not_asked_as_a_stream_is_billed_by_our_count(live):
    live.upstream.configure(tokens=9, always_streams=True)
    before = live.balance_nano()
    answer = live.sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert answer.choices[0].message.content == text_for(9)
    assert answer.usage.completion_tokens == count_text_tokens(text_for(9), "gpt-4o")
    (record,) = live.records()
    assert record.usage_source == UsageSource.ESTIMATED
    assert record.completion_tokens == answer.usage.completion_tokens
    assert live.balance_nano() == before - record.charged_nano == before - cost_of(record)


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_before_the_answer_is_a_500_and_the_call_is_settled(live, monkeypatch, stream):
    """An error of real200's own (injected here) answers OpenAI's 500 error and still
    settles the call: its hold goes back, its usage record says it failed."""
    from apps.gateway.providers import openai

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(openai, "_choices", broken)
    before = live.balance_nano()
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": stream}
    response = live.post(body)
    assert response.status_code == 500
    assert_valid("ErrorResponse", response.json())
    assert response.json()["error"]["type"] == "api_error"
    (record,) = live.wait_settled()
    assert (record.end_reason, record.status_code) == (EndReason.UPSTREAM_ERROR, 500)
    assert record.charged_nano == 0
    assert live.balance_nano() == before
    assert live.held_nano() == 0


def test_a_bug_relaying_the_first_event_is_a_500_and_the_call_is_settled(live, monkeypatch):
    from apps.gateway import calls

    def broken(self, event):
        raise RuntimeError("injected")

    monkeypatch.setattr(calls.StreamWriter, "event", broken)
    live.upstream.configure(tokens=200, pace=0.02)
    before = live.balance_nano()
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": True}
    response = live.post(body)
    assert response.status_code == 500
    assert_valid("ErrorResponse", response.json())
    (record,) = live.wait_settled()
    assert (record.end_reason, record.status_code) == (EndReason.UPSTREAM_ERROR, 500)
    assert live.balance_nano() == before
    assert live.upstream.calls[-1].wait_disconnected(seconds=2)  # the upstream is let go


def test_a_whole_answer_without_usage_bills_the_reasoning_it_shows(live):
    live.upstream.configure(tokens=4, reasoning_tokens=25, usage=False)
    answer = live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}).json()
    assert answer["choices"][0]["message"]["reasoning_content"] == text_for(25)
    (record,) = live.records()
    assert record.usage_source == UsageSource.ESTIMATED
    assert record.completion_tokens == count_text_tokens(text_for(25) + text_for(4), "gpt-4o")


@pytest.mark.parametrize(
    ("reported", "billed"),
    [
        ({"prompt_tokens": 21.0, "cached_tokens": 5.0}, (21, 5)),  # whole floats: counts
        ({"prompt_tokens": 21, "cached_tokens": 40}, (21, 21)),  # reads past the prompt
        ({"prompt_tokens": 21, "cached_tokens": -3}, (21, 0)),
    ],
)
def test_odd_usage_from_an_upstream_is_billed_in_whole_tokens(live, reported, billed):
    """Counts a buggy compatible server may send must neither break the settlement (the
    call would go unbilled, its hold left open) nor put a float into money."""
    before = live.balance_nano()
    live.upstream.configure(tokens=7, **reported)
    assert live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}).status_code == 200
    (record,) = live.records()
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (*billed, 7)
    assert type(record.cost_nano) is int
    assert record.charged_nano == cost_of(record) > 0
    assert live.balance_nano() == before - record.charged_nano
    assert live.held_nano() == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_whose_usage_is_no_count_is_billed_on_real200s_own(live, stream):
    """A server that sends null (or a string, or a negative) for its prompt tokens gave no
    count: the call is billed on what real200 counted, never as free."""
    live.upstream.configure(tokens=7, prompt_tokens=None)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": stream}
    assert live.post(body).status_code == 200
    (record,) = live.wait_settled()
    assert record.usage_source == UsageSource.ESTIMATED
    assert record.prompt_tokens == count_prompt_tokens(MESSAGES, "gpt-4o")
    assert record.completion_tokens == count_text_tokens(text_for(7), "gpt-4o")
    assert record.charged_nano == cost_of(record) > 0
    assert live.held_nano() == 0


def test_every_call_has_an_id_of_its_own(live):
    ids = {
        live.sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        ).id
        for _ in range(3)
    }
    assert len(ids) == 3
    assert {record.request_id for record in live.records()} == ids


def test_a_tool_call_comes_back_in_openais_shape(live):
    live.upstream.configure(tokens=0, tool_call=PARIS)
    before = live.balance_nano()
    raw = live.sdk.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    assert_valid("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    sent = live.upstream.calls[-1].body
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    (record,) = live.records()
    assert record.completion_tokens > 0
    assert live.balance_nano() == before - cost_of(record)


def test_the_customers_parameters_reach_the_upstream_as_sent(live):
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    live.sdk.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": "JSON only."}, {"role": "user", "content": "Hi"}],
        response_format=schema,
        stop=["\n\n", "END"],
        seed=1234,
        temperature=0.3,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="customer-42",
        max_completion_tokens=64,
        extra_body={"frobnicate": True},
    )
    sent = live.upstream.calls[-1].body
    assert sent["response_format"] == schema
    assert sent["stop"] == ["\n\n", "END"]
    assert sent["seed"] == 1234
    assert (sent["temperature"], sent["top_p"]) == (0.3, 0.9)
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, -0.5)
    assert sent["user"] == "customer-42"
    assert sent["max_completion_tokens"] == 64
    assert "max_tokens" not in sent
    assert "frobnicate" not in sent  # unknown fields are dropped, never sent on
    assert "stream" not in sent


def test_without_max_tokens_the_upstream_is_capped_at_the_models_limit(live):
    live.sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert live.upstream.calls[-1].body["max_tokens"] == 4096  # $10 affords it all


def test_an_answer_cut_by_max_tokens_finishes_with_length(live):
    live.upstream.configure(tokens=20)
    answer = live.sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Count."}], max_tokens=3
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


def test_a_call_whose_upstream_reports_no_usage_is_billed_by_our_own_count(live):
    live.upstream.configure(tokens=9, usage=False)
    before = live.balance_nano()
    answer = live.sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    prompt = count_prompt_tokens(MESSAGES, "gpt-4o")
    completion = count_text_tokens(text_for(9), "gpt-4o")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, completion)
    (record,) = live.records()
    assert record.usage_source == UsageSource.ESTIMATED
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, completion)
    assert record.cost_nano == record.charged_nano == cost_of(record) > 0
    assert live.balance_nano() == before - cost_of(record)


def test_an_anthropic_channel_answers_in_openais_shape_and_bills_its_cache_tokens(live, claude):
    # Anthropic's input_tokens leaves out cache reads and writes: 10 + 4 read + 6 written.
    claude.configure(tokens=6, prompt_tokens=10, cached_tokens=4, cache_creation_tokens=6)
    before = live.balance_nano()
    raw = live.sdk.chat.completions.with_raw_response.create(
        model="claude-sonnet-4",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=100,
        stop="END",
    )
    body = raw.http_response.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["model"] == "claude-sonnet-4"
    assert body["choices"][0]["message"]["content"] == text_for(6)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 20
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    sent = claude.calls[-1]
    assert sent.path == "/v1/messages"
    assert sent.body["model"] == "claude-sonnet-4-20250514"
    assert sent.body["system"] == "Be brief."
    assert sent.body["stop_sequences"] == ["END"]
    assert sent.body["max_tokens"] == 100
    assert sent.headers["x-api-key"] == "sk-anthropic-secret"
    assert live.upstream.calls == []
    (record,) = live.records()
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (20, 4, 6)
    assert record.cache_write_tokens == 6
    assert record.usage_source == UsageSource.UPSTREAM
    # Per 1M tokens: 10 plain prompt tokens at $3, 4 cache reads at $0.30, 6 cache writes at
    # $3.75, 6 output tokens at $15.
    expected = 10 * 3_000 + 4 * 300 + 6 * 3_750 + 6 * 15_000
    assert record.cost_nano == record.charged_nano == expected == cost_of(record)
    assert live.balance_nano() == before - expected


def test_a_prompt_written_whole_to_the_cache_costs_no_more_than_its_hold(live, claude):
    """The hold prices every prompt token at the dearest prompt rate, here the cache-write
    rate: a prompt the upstream writes whole to its cache, with all the output the call may
    have, costs exactly its hold (at the input rate the hold would fall short). Settled by
    the one statement, which takes a cost within the hold, and charged in full."""
    messages = [{"role": "user", "content": "Keep this long document in mind."}]
    prompt = count_prompt_tokens(messages, "claude-sonnet-4")  # what the hold is placed for
    claude.configure(tokens=20, prompt_tokens=0, cache_creation_tokens=prompt)
    before = live.balance_nano()
    raw = live.sdk.chat.completions.with_raw_response.create(
        model="claude-sonnet-4", messages=messages, max_tokens=20
    )
    usage = raw.http_response.json()["usage"]
    # OpenAI's shape, nothing added: cache writes are prompt tokens, and not cache reads.
    assert usage == {"prompt_tokens": prompt, "completion_tokens": 20, "total_tokens": prompt + 20}
    (record,) = live.records()
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens) == (
        prompt,
        0,
        prompt,
    )
    expected = prompt * 3_750 + 20 * 15_000
    assert record.cost_nano == record.charged_nano == expected == cost_of(record)
    hold = Hold.objects.get(request_id=record.request_id)
    assert (hold.amount_nano, hold.status) == (expected, HoldStatus.SETTLED)
    assert expected > prompt * 3_000 + 20 * 15_000
    assert live.balance_nano() == before - expected
    assert live.held_nano() == 0


def test_an_anthropic_tool_call_comes_back_as_an_openai_tool_call(live, claude):
    claude.configure(tokens=2, tool_call=PARIS)
    answer = live.sdk.chat.completions.create(
        model="claude-sonnet-4",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=100,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert orjson.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    sent = claude.calls[-1].body
    assert sent["tools"][0]["name"] == "get_weather"
    assert sent["tool_choice"] == {"type": "any"}


def test_a_client_that_gives_up_on_a_whole_answer_pays_for_the_answer_made_for_it(live):
    """The upstream bills a non-streamed call whether or not its caller stays; its usage is
    known only with the whole answer. So real200 waits for that answer after its client
    has gone, and bills what the upstream reports."""
    count_prompt_tokens(MESSAGES, "gpt-4o")  # the vocabulary loaded: the call opens at once
    live.upstream.configure(tokens=20, pace=0.05, prompt_tokens=12)  # the answer in 1 s
    before = live.balance_nano()
    with pytest.raises(httpx.ReadTimeout):
        live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100}, timeout=0.3)
    (record,) = live.wait_settled()
    (call,) = live.upstream.calls
    assert call.completed, "real200 closed the upstream call"
    assert record.end_reason == EndReason.CLIENT_GONE
    assert record.status_code == 499
    assert record.usage_source == UsageSource.UPSTREAM
    assert (record.prompt_tokens, record.completion_tokens) == (12, 20)
    assert record.charged_nano == cost_of(record) > 0
    assert live.balance_nano() == before - record.charged_nano
    assert live.held_nano() == 0


def test_a_whole_answer_past_the_longest_call_time_is_a_504_that_costs_nothing(
    live, backup, settings
):
    """A non-streamed call has the same longest time as a stream: an upstream that takes
    longer (or keeps its connection alive with whitespace while it thinks) would otherwise
    outlive the call's hold, and its answer go unbilled. Nothing was delivered, so nothing
    is billed, and no other channel is tried: the first may still bill us."""
    from apps.gateway.errors import UpstreamTimeout

    count_prompt_tokens(MESSAGES, "gpt-4o")
    settings.GATEWAY_MAX_CALL_SECONDS = 0.5
    live.upstream.configure(tokens=40, pace=0.05)  # the answer in 2 s
    before = live.balance_nano()
    response = live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == UpstreamTimeout.code
    assert "longest time a call may take" in response.json()["error"]["message"]
    (call,) = live.upstream.calls
    assert call.wait_disconnected(seconds=1), "real200 kept waiting for the upstream"
    assert backup.calls == []
    (record,) = live.wait_settled()
    assert record.end_reason == EndReason.TIMEOUT
    assert record.status_code == 504
    assert record.charged_nano == 0
    assert live.balance_nano() == before
    assert live.held_nano() == 0


def test_a_client_that_gave_up_is_not_retried_on_another_channel(live, backup):
    count_prompt_tokens(MESSAGES, "gpt-4o")
    live.upstream.configure(header_delay=0.6, fail_status=503)
    before = live.balance_nano()
    with pytest.raises(httpx.ReadTimeout):
        live.post({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100}, timeout=0.3)
    (record,) = live.wait_settled()
    assert len(live.upstream.calls) == 1
    assert backup.calls == []
    assert record.status_code == 499
    assert record.charged_nano == 0
    assert live.balance_nano() == before
    assert live.held_nano() == 0


def test_an_upstream_reporting_more_output_than_allowed_is_billed_no_more_than_max_tokens(live):
    # Three words and a tool call of four more tokens, against a limit of three.
    live.upstream.configure(tokens=3, tool_call=PARIS, prompt_tokens=10)
    before = live.balance_nano()
    answer = live.sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], max_tokens=3
    )
    assert answer.usage.completion_tokens == 3
    (record,) = live.records()
    assert (record.prompt_tokens, record.completion_tokens) == (10, 3)
    assert record.usage_source == UsageSource.UPSTREAM
    assert live.balance_nano() == before - cost_of(record)


def test_an_answer_capped_at_max_tokens_keeps_its_cache_writes(live, claude):
    # Two words and a tool call of two more tokens, against a limit of three.
    claude.configure(tokens=2, tool_call=PARIS, prompt_tokens=10, cache_creation_tokens=6)
    answer = live.sdk.chat.completions.create(
        model="claude-sonnet-4", messages=MESSAGES, tools=[WEATHER_TOOL], max_tokens=3
    )
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (16, 3)
    (record,) = live.records()
    assert (record.prompt_tokens, record.cache_write_tokens, record.completion_tokens) == (16, 6, 3)
    assert record.charged_nano == cost_of(record)
