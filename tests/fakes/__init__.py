"""Stand-ins for the outside world that tests and benchmarks talk to over real sockets."""

from tests.fakes.upstreams import (
    BEHAVIOUR_HEADER,
    AnthropicFake,
    Behaviour,
    Call,
    FakeUpstream,
    OpenAIFake,
    text_for,
)

__all__ = [
    "BEHAVIOUR_HEADER",
    "AnthropicFake",
    "Behaviour",
    "Call",
    "FakeUpstream",
    "OpenAIFake",
    "text_for",
]
