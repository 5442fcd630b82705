"""Which model replica holds which token prefix: the ingress's routing table.

Each replica keeps states in its own prefix cache (serving/prefix_cache.py). The ingress learns
where they are from the replies themselves: a reply that ends on replica R leaves R holding the
state after the prompt and after the reply, so both prefixes are recorded for R. A request is
then routed to the replica holding its longest recorded prefix: the next turn of a conversation
goes where the conversation lives (affinity), a request that shares a prefix (an API client that
resends its history, a document asked about again) goes where that prefix was read.

The table is the same radix tree the replicas use, with a Placement (a replica id) in place of a
state: same namespaces and sharing rule, and a budget counted in entries. It is a hint: a
replica may have evicted the state since, or be gone; the replica then takes the state the
ingress kept, or rebuilds it from the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..serving.prefix_cache import PrefixCache

DEFAULT_ENTRIES = 10_000  # eviction scans the tree, so keep it small


@dataclass
class Placement:
    """Stands in for a state in the tree: who holds the state after `seqlen` tokens."""

    replica: str
    seqlen: int
    nbytes: ClassVar[int] = 1  # the tree's byte budget counts entries
    device: ClassVar[torch.device] = torch.device("cpu")


class ReplicaIndex:
    def __init__(self, shared: bool = False, max_entries: int = DEFAULT_ENTRIES):
        self._tree = PrefixCache(budget_bytes=max_entries, shared=shared)

    def record(self, namespace: str, tokens: list[int], replica: str) -> None:
        """`replica` holds the state after `tokens` (it just read them)."""
        if tokens:
            node = self._tree.insert(tokens, Placement(replica, len(tokens)), namespace)
            node.state.replica = replica  # the latest holder wins

    def find(self, namespace: str, tokens: list[int]) -> tuple[int, str | None]:
        """(n, replica) for the longest recorded prefix tokens[:n]; (0, None) when none."""
        n, node = self._tree.find(tokens, namespace)
        return (n, node.state.replica) if node is not None else (0, None)

    def forget(self, namespace: str) -> None:
        """A session that ended: its prefixes are no longer worth routing by."""
        self._tree.drop_namespace(namespace)

    def __len__(self) -> int:
        return self._tree.stats()["states"]
