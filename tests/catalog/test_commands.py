from __future__ import annotations

import pytest
from django.core.management.base import CommandError

from apps.catalog.models import Channel, ChannelModel, Price


def test_set_price_adds_a_version_and_keeps_the_old_one(run_command):
    run_command("set_price", "gpt-4o", "--input", "2.50", "--output", "10")
    line = run_command(
        "set_price", "gpt-4o", "--input", "3", "--output", "12", "--cached-input", "0.3"
    )[-1]
    assert (
        "input 3.000000000, cached input 0.300000000, cache write 3.000000000, "
        "output 12.000000000" in line
    )
    old, new = Price.objects.order_by("pk")
    assert (old.input_nano_per_mtok, old.cached_input_nano_per_mtok) == (
        2_500_000_000,
        2_500_000_000,
    )
    assert (new.input_nano_per_mtok, new.output_nano_per_mtok) == (3 * 10**9, 12 * 10**9)


def test_set_price_takes_a_cache_write_rate_that_defaults_to_the_input_rate(run_command):
    run_command("set_price", "claude-sonnet-4", "--input", "3", "--output", "15")
    line = run_command(
        "set_price", "claude-sonnet-4", "--input", "3", "--output", "15", "--cache-write", "3.75"
    )[-1]
    assert "cache write 3.750000000" in line
    default, given = Price.objects.order_by("pk")
    assert default.cache_write_nano_per_mtok == default.input_nano_per_mtok == 3 * 10**9
    assert given.cache_write_nano_per_mtok == 3_750_000_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["m", "--input", "-1", "--output", "1"], "--input: .*negative"),
        (["m", "--input", "1", "--output", "x"], "--output: .*not an amount"),
        (["m", "--input", "1", "--output", "1", "--cached-input", "0.0000000001"], "finer than"),
        (["m", "--input", "1", "--output", "1", "--cache-write", "-1"], "--cache-write: .*neg"),
    ],
)
def test_set_price_refuses_bad_input(run_command, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("set_price", *args)
    assert not Price.objects.exists()


def test_add_channel_maps_models_to_upstream_names(run_command):
    line = run_command(
        "add_channel",
        "deepseek",
        "--type",
        "openai",
        "--base-url",
        "https://api.example.com/v1/",
        "--api-key",
        "sk-up",
        "--models",
        "deepseek-chat,fast=deepseek-v3",
        "--priority",
        "5",
        "--weight",
        "3",
        "--timeout",
        "30",
    )[-1]
    assert (
        line
        == "added channel deepseek (openai) serving deepseek-chat=deepseek-chat, fast=deepseek-v3"
    )
    channel = Channel.objects.get()
    assert (channel.base_url, channel.priority, channel.weight, channel.timeout_seconds) == (
        "https://api.example.com/v1",
        5,
        3,
        30.0,
    )
    assert ChannelModel.objects.count() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c", "--type", "openai", "--models", "m"], "needs --base-url"),
        (["c", "--type", "openai", "--base-url", "ftp://x", "--models", "m"], "not an http"),
        (["c", "--type", "demo", "--models", " , "], "at least one model"),
        (["c", "--type", "demo", "--models", "a,a"], "listed twice"),
        (["c", "--type", "demo", "--models", "a", "--weight", "0"], "weight"),
        (["c", "--type", "demo", "--models", "a", "--timeout", "0"], "timeout"),
    ],
)
def test_add_channel_refuses_bad_input(run_command, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("add_channel", *args)
    assert not Channel.objects.exists()


def test_add_channel_refuses_an_unknown_type(run_command):
    with pytest.raises(CommandError, match="invalid choice"):
        run_command("add_channel", "c", "--type", "grok", "--models", "a")


def test_add_channel_refuses_a_taken_name(run_command):
    run_command("add_channel", "c", "--type", "demo", "--models", "a")
    with pytest.raises(CommandError, match="already exists"):
        run_command("add_channel", "c", "--type", "demo", "--models", "b")
