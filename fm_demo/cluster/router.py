"""Replica choice in the cluster's two deployments (Serve runs a RequestRouter per handle).

AffinityRouter (model replicas, in the ingress process): the ingress decides which replica holds
a request's longest prefix (placement.py) and names it in the request (`ReplyRequest.prefer`);
this router only applies that choice:
  rank 1: the preferred replica, when it is running;
  rank 2: every other replica (in random order, so ties between idle replicas spread).
Serve tries a rank's replicas in order of queue length and skips those whose queue is full
(max_ongoing_requests), so a preferred replica that is full, gone or not yet known sends the
request to the least loaded one instead; the state then moves there with the request.

SessionRouter (ingress replicas, in Serve's HTTP proxy): Gradio keeps a session's queue in the
process that serves it, so every request of a browser session (or gradio_client Client) must
reach the same ingress replica. The session is the `fm_session` cookie the ingress sets on its
first response (gradio_client keeps cookies of its first response too), or an x-session-id header,
or Gradio's session_hash query parameter; rendezvous hashing maps it to a replica, so when a
replica is added or lost only the sessions that must move do. Requests with no session (the page,
static files) go to the least loaded replica.
"""

from __future__ import annotations

import hashlib
import random
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SESSION_COOKIE = "fm_session"


def preferred_replica(pending: PendingRequest | None) -> str | None:
    """The replica id a request asks for (the `prefer` of its ReplyRequest argument), if any."""
    if pending is None or not pending.args:
        return None
    return getattr(pending.args[0], "prefer", None)


class AffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prefer = preferred_replica(pending_request)
        first = [r for r in candidate_replicas if prefer is not None and r.replica_id.unique_id == prefer]
        rest = [r for r in candidate_replicas if r not in first]
        random.shuffle(rest)  # equal queues: a random one, so idle replicas share new conversations
        return [rank for rank in (first, rest) if rank]


def session_key(scope: dict | None, header_session: str = "") -> str | None:
    """The browser session of an HTTP request (ASGI scope): cookie, x-session-id, or session_hash."""
    if header_session:
        return header_session
    if not scope:
        return None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"cookie":
            cookie = SimpleCookie()
            cookie.load(value.decode("latin-1"))
            if SESSION_COOKIE in cookie:
                return cookie[SESSION_COOKIE].value
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    return (query.get("session_hash") or [None])[0]


def rendezvous(key: str, replica_ids: list[str]) -> str:
    """The replica for `key`: highest hash of (key, replica); stable while that replica lives."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{key}|{r}".encode(), digest_size=8).digest())


class SessionRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = None
        if pending_request is not None:
            request = pending_request.args[0] if pending_request.args else None
            key = session_key(getattr(request, "asgi_scope", None), pending_request.metadata.session_id)
        if key is None or not candidate_replicas:
            return [candidate_replicas]
        chosen = rendezvous(key, [r.replica_id.unique_id for r in candidate_replicas])
        return [[r for r in candidate_replicas if r.replica_id.unique_id == chosen]]
