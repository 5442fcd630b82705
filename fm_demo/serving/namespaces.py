"""Prefix-cache namespaces: which requests may read each other's states (prefix_cache.py).

A namespace is `kind:digest`, derived by the server from what identifies a client, never a
string a client sends as it is: digest = HMAC-SHA256(server secret, [kind, *parts]). The secret
is Settings.cache_secret (FM_DEMO_CACHE_SECRET) when set, else random per process. So no client
can name a namespace of another kind (a browser's session hash cannot land in an API client's
namespace), nor compute one from another client's address or key, and none is kept in memory
in the clear. The kinds:
    browser      a Gradio session (its session hash)
    api-salt     an API request's bearer token (or none) with its `cache_salt`
    api-user     an API request's bearer token (or none) with its `user`
    api-key      an API request's bearer token with the client's address
    api-address  an API request with none of those: the client's address
    private      an imported conversation (private_namespace(): random, derived from nothing)
Private namespaces hold states the server did not read itself: they get a root of their own in
every PrefixCache, with sharing on as well, so nothing derived from such a state is ever found by
another request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

BROWSER, API_SALT, API_USER, API_KEY, API_ADDRESS, PRIVATE = (
    "browser", "api-salt", "api-user", "api-key", "api-address", "private")
_PROCESS_SECRET = secrets.token_bytes(32)  # used when the settings give none


def derive(kind: str, *parts: str, secret: str = "") -> str:
    """The namespace of a client of `kind` identified by `parts` (see the module docstring)."""
    key = secret.encode() if secret else _PROCESS_SECRET
    message = json.dumps([kind, *parts]).encode()  # a list: no two part lists read the same
    return f"{kind}:{hmac.new(key, message, hashlib.sha256).hexdigest()[:32]}"


def private_namespace() -> str:
    """A fresh namespace no other request can name (an imported conversation's)."""
    return f"{PRIVATE}:{secrets.token_hex(16)}"


def is_private(namespace: str) -> bool:
    return namespace.startswith(PRIVATE + ":")
