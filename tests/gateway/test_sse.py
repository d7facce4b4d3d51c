"""The SSE reader of the HTTP adapters: an event's data, whatever pieces its bytes come in."""

from __future__ import annotations

import pytest

from apps.gateway.providers._http import SseEvents

# OpenAI's framing, then what other servers send: comments and event names (Anthropic),
# an id, several data lines, "data:" without its space, CRLF line ends, extra blank lines.
STREAM = (
    b'data: {"n":1}\n\n'
    b": keep-alive\n\n"
    b"event: message_start\n"
    b'data: {"n":2}\n\n'
    b"id: 7\r\n"
    b'data: {"n":\r\n'
    b"data: 3}\r\n\r\n"
    b'data:{"n":4}\n\n\n'
    b"retry: 1000\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [b'{"n":1}', b'{"n":2}', b'{"n":\n3}', b'{"n":4}', b"[DONE]"]


def read(*chunks: bytes) -> list[bytes]:
    events = SseEvents()
    found = [data for chunk in chunks for data in events.feed(chunk)]
    if (last := events.end()) is not None:
        found.append(last)
    return found


def test_every_event_of_a_stream_read_whole():
    assert read(STREAM) == EVENTS


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_stream_cut_anywhere_reads_the_same(cut: int):
    assert read(STREAM[:cut], STREAM[cut:]) == EVENTS


def test_a_stream_read_byte_by_byte_reads_the_same():
    assert read(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == EVENTS


def test_an_event_is_given_as_soon_as_its_blank_line_arrives():
    events = SseEvents()
    assert events.feed(b'data: {"n":1}\n') == []
    assert events.feed(b"\n") == [b'{"n":1}']


@pytest.mark.parametrize("tail", [b'data: {"n":9}', b'data: {"n":9}\n', b'data: {"n":9}\r\n'])
def test_a_last_event_without_its_blank_line_is_still_read(tail: bytes):
    assert read(b'data: {"n":1}\n\n' + tail) == [b'{"n":1}', b'{"n":9}']


def test_blocks_without_data_are_no_events():
    assert read(b": ping\n\nevent: ping\n\nid: 3\n\n") == []
