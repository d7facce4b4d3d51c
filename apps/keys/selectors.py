"""Reads on API keys."""

from __future__ import annotations

from apps.keys.models import KEY_PREFIX, ApiKey, hash_key


class KeyNotFound(LookupError):
    pass


def key_get_by_reference(*, reference: str) -> ApiKey:
    """The key an operator names by its full text, its display prefix, or its id.

    An ambiguous prefix is refused rather than guessed.
    """
    reference = reference.strip()
    if reference.isdigit():
        key = ApiKey.objects.filter(pk=int(reference)).first()
    elif reference.startswith(KEY_PREFIX) and len(reference) > 32:
        key = ApiKey.objects.filter(key_hash=hash_key(reference)).first()
    else:
        prefix = reference.split("…")[0]
        matches = list(ApiKey.objects.filter(prefix__startswith=prefix)[:2]) if prefix else []
        if len(matches) > 1:
            raise KeyNotFound(f"{reference!r} matches more than one key; give the id instead")
        key = matches[0] if matches else None
    if key is None:
        raise KeyNotFound(f"no key matches {reference!r}")
    return key
