"""Provider adapters, one per upstream kind, each behind base.Provider."""

from __future__ import annotations

from apps.gateway.providers.anthropic import AnthropicProvider
from apps.gateway.providers.base import Provider
from apps.gateway.providers.demo import DemoProvider
from apps.gateway.providers.openai import OpenAIProvider

# Adapters keep no state between calls, so one instance of each serves every request.
_PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "anthropic": AnthropicProvider(),
    "demo": DemoProvider(),
}

KINDS = tuple(_PROVIDERS)


def get_provider(kind: str) -> Provider:
    """The adapter for a channel's kind; KeyError for a kind we do not have."""
    try:
        return _PROVIDERS[kind]
    except KeyError:
        raise KeyError(
            f"no provider adapter for kind {kind!r}; known: {', '.join(KINDS)}"
        ) from None
