"""Prefix-cache namespaces: which requests may read each other's states (prefix_cache.py).

A namespace is `kind:name`. Private ones (kind `private`) hold states the server did not read
itself, an imported conversation's: they get a root of their own in every PrefixCache, with
sharing on as well, so nothing derived from such a state is ever found by another request.
"""

from __future__ import annotations

import secrets

PRIVATE = "private"


def private_namespace() -> str:
    """A fresh namespace no other request can name (an imported conversation's)."""
    return f"{PRIVATE}:{secrets.token_hex(16)}"


def is_private(namespace: str) -> bool:
    return namespace.startswith(PRIVATE + ":")
