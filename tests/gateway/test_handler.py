"""The /v1 handler (config/asgi.py) against a live real200: no hop to a thread for
Django's request signals."""

from __future__ import annotations

import asyncio
import gc
import time

import httpx
import pytest
from django.core import signals

pytestmark = pytest.mark.postgres


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_the_api_sends_no_request_signals_and_the_pages_still_do(live):
    """Django sends `request_started` in the process's thread for synchronous code, and
    `request_finished` when it closes the response (in that thread too): two hops per
    request, whose receivers clean up connections the API never opens in that thread.
    The API sends neither; the dashboard's pages keep both, in the thread where their
    database connections are given back."""
    sent: list[tuple[str, str, bool]] = []

    def note(signal, sender, **kwargs) -> None:
        name = "started" if signal is signals.request_started else "finished"
        sent.append((name, sender.__name__, _on_event_loop()))

    signals.request_started.connect(note)
    signals.request_finished.connect(note)
    try:
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
        assert live.post(chat).status_code == 200
        assert live.post({**chat, "stream": True}).status_code == 200
        assert live.post({"model": "gpt-4o"}).status_code == 400
        assert sent == []

        sent.clear()
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        deadline = time.monotonic() + 5
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # request_finished comes once the answer has been sent
    finally:
        signals.request_started.disconnect(note)
        signals.request_finished.disconnect(note)
    assert sent == [("started", "ASGIHandler", False), ("finished", "ASGIHandler", False)]


def test_what_the_server_loaded_at_start_up_is_exempt_from_the_garbage_collector(live):
    """A full pass of the cyclic collector over Django and its libraries takes tens of
    milliseconds, during which no stream moves; frozen at start-up, they are not walked."""
    assert gc.get_freeze_count() > 50_000
