"""A token-exact prefix-state cache shared by every request to one model.

A radix tree over token ids. A node stands for the token sequence on the path from its namespace's
root to it, and may hold the recurrent state after reading exactly that sequence. Falcon Mamba
continues exactly from any state, so a request finds the longest prefix of its tokens that has a
state, reads only the rest, and adds the states at its own boundaries (turn ends, the point before
each reply, the end of a read document, the end of a request's prompt and reply). Unlike a KV
cache on a block grid, a hit resumes at any token.

Invariants:
- A stored state is never modified (readers get a copy), so any number of conversations can hold
  references to it; a conversation keeps its transcript and its references, not copies.
- A state found for tokens[:n] equals the state from reading tokens[:n] from scratch, whoever
  wrote it (up to float rounding between prefill and decode steps).
- Memory is a byte budget over all stored states. Checkpoints (states a long prompt left every
  few thousand tokens on its way) go first, then the states callers asked for (turn and message
  ends); within each, the least recently used unpinned states go first, leaves before inner
  nodes. Eviction loses only time: whoever needs an evicted state reads its tokens again.

Privacy: a hit is visible (speed, cached_tokens), so sharing across sessions is a setting, off by
default. Off, each namespace (a browser session, an API client: namespaces.py) has its own root and
never sees another's states; on, every request shares one root (a team server, a document demo),
except private namespaces (namespaces.py: an imported conversation's), which keep a root of their
own either way: a shared node only ever holds a state the server read from its tokens itself.
Sharing states never shares transcripts: a node stores token ids and a state, no text.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..engine import State
from .namespaces import is_private

SHARED = "\x00shared"  # the one namespace when sharing is on


class Node:
    __slots__ = ("edge", "children", "parent", "state", "depth", "last_used", "pins", "holders", "checkpoint")

    def __init__(self, edge: tuple[int, ...], parent: Node | None, depth: int):
        self.edge = edge  # tokens from the parent to this node
        self.children: dict[int, Node] = {}  # by the first token of the child's edge
        self.parent = parent
        self.state: State | None = None  # after reading the path's tokens, or None
        self.depth = depth  # tokens from the root
        self.last_used = time.monotonic()
        self.pins = 0  # rows running from this state right now
        self.holders = 0  # conversations that keep this state as one of their snapshots
        self.checkpoint = False  # a state kept on the way through a long prompt: evicted first

    @property
    def alive(self) -> bool:
        """Still in the tree (an evicted leaf is cut off: its parent no longer lists it)."""
        node = self
        while node.parent is not None:
            if node.parent.children.get(node.edge[0]) is not node:
                return False
            node = node.parent
        return True


def _common(edge: tuple[int, ...], tokens: list[int], at: int) -> int:
    """Length of the common prefix of `edge` and tokens[at:]."""
    n = min(len(edge), len(tokens) - at)
    if tuple(tokens[at:at + n]) == edge[:n]:
        return n
    lo, hi = 0, n  # binary search on slice equality: C-speed compares, O(log n) of them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tuple(tokens[at:at + mid]) == edge[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    def __init__(self, budget_bytes: int, shared: bool = False, device: torch.device | str = "cpu"):
        self.budget_bytes, self.shared, self.device = budget_bytes, shared, torch.device(device)
        self._roots: dict[str, Node] = {}
        self._lock = threading.RLock()
        self._bytes = 0
        self._states = 0
        self._counts = dict(lookups=0, hits=0, hit_tokens=0, looked_up_tokens=0, inserts=0, evictions=0,
                            evicted_bytes=0)

    def _shares(self, namespace: str) -> bool:
        """Whether `namespace` reads and writes the one shared root."""
        return self.shared and not is_private(namespace)

    def _root(self, namespace: str) -> Node:
        key = SHARED if self._shares(namespace) else namespace
        root = self._roots.get(key)
        if root is None:
            root = self._roots[key] = Node((), None, 0)
        return root

    # -- reading -------------------------------------------------------------------------------
    def find(self, tokens: list[int], namespace: str = "", count: bool = False) -> tuple[int, Node | None]:
        """(n, node) of the longest prefix tokens[:n] with a stored state (n = 0, None: none);
        count=True counts the look-up towards the hit rate."""
        with self._lock:
            node, at, best = self._root(namespace), 0, None
            while True:
                if node.state is not None:
                    best = node
                if at == len(tokens):
                    break
                child = node.children.get(tokens[at])
                if child is None or _common(child.edge, tokens, at) < len(child.edge):
                    break
                node, at = child, at + len(child.edge)
            if best is not None:
                best.last_used = time.monotonic()
            n = best.depth if best is not None else 0
            if count:
                self._counts["lookups"] += 1
                self._counts["looked_up_tokens"] += len(tokens)
                self._counts["hits"] += n > 0
                self._counts["hit_tokens"] += n
            return (n, best) if best is not None else (0, None)

    def lookup(self, tokens: list[int], namespace: str, device: torch.device | str,
               fresh: Callable[[], State]) -> tuple[int, State, Node | None]:
        """(n, a private copy on `device` of the state after tokens[:n], its node) for the longest
        cached prefix; (0, fresh(), None) when none. Counts towards the hit rate."""
        with self._lock:
            n, node = self.find(tokens, namespace, count=True)
            if node is None:
                return 0, fresh(), None
            state = node.state
            copy = state.clone() if state.device == torch.device(device) else state.to(device)
        return n, copy, node

    def get(self, node: Node | None) -> State | None:
        """The stored state of a node someone holds a reference to (None once evicted)."""
        with self._lock:
            if node is None or node.state is None or not node.alive:
                return None
            node.last_used = time.monotonic()
            return node.state

    # -- writing -------------------------------------------------------------------------------
    def insert(self, tokens: list[int], state: State, namespace: str = "", checkpoint: bool = False) -> Node:
        """Keep `state` (after reading exactly `tokens`) and return its node.

        The cache takes the state as it is when it is on the cache's device (the caller must not
        modify it afterwards), else a copy. A state already stored for these tokens is kept (a
        checkpoint becomes a kept state when someone asks to keep it).
        """
        if state.seqlen != len(tokens):
            raise ValueError(f"a state after {state.seqlen} tokens cannot be stored for {len(tokens)} tokens")
        with self._lock:
            node = self._path(tokens, namespace)
            node.last_used = time.monotonic()
            if node.state is not None and not checkpoint:
                node.checkpoint = False
            if node.state is None and tokens:
                node.checkpoint = checkpoint
                node.state = state if state.device == self.device else state.to(self.device)
                self._bytes += node.state.nbytes
                self._states += 1
                self._counts["inserts"] += 1
                self._evict_to_budget(keep=node)
            return node

    def _path(self, tokens: list[int], namespace: str) -> Node:
        """The node for exactly `tokens`, splitting an edge or growing a branch as needed."""
        node, at = self._root(namespace), 0
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None:
                leaf = Node(tuple(tokens[at:]), node, len(tokens))
                node.children[tokens[at]] = leaf
                return leaf
            k = _common(child.edge, tokens, at)
            if k < len(child.edge):  # split: node -> mid (edge[:k]) -> child (edge[k:])
                mid = Node(child.edge[:k], node, node.depth + k)
                node.children[tokens[at]] = mid
                child.edge, child.parent = child.edge[k:], mid
                mid.children[child.edge[0]] = child
                child = mid
            node, at = child, at + k
        return node

    def hold(self, node: Node) -> Node:
        """A conversation keeps `node` as a snapshot (see release)."""
        with self._lock:
            node.holders += 1
        return node

    def release(self, node: Node) -> None:
        """A conversation lets go of `node`; the state stays for look-ups until the budget needs
        the room (least recently used first) or its namespace frees what nobody holds."""
        with self._lock:
            node.holders = max(0, node.holders - 1)

    def discard_unheld(self, namespace: str) -> int:
        """Free every state of `namespace` that no conversation holds and no row uses (a session
        trimming its memory); nothing when it shares the root (others may hit). Returns bytes freed."""
        if self._shares(namespace):
            return 0
        with self._lock:
            root = self._roots.get(namespace)
            if root is None:
                return 0
            stack, unheld = [root], []
            while stack:
                node = stack.pop()
                if node.state is not None and node.holders == 0 and node.pins == 0:
                    unheld.append(node)
                stack.extend(node.children.values())
            return sum(self.discard(node) for node in unheld)

    def discard(self, node: Node | None) -> int:
        """Drop a node's state now (its owner frees memory); returns the bytes freed."""
        with self._lock:
            if node is None or node.state is None or node.pins or not node.alive:
                return 0
            freed = node.state.nbytes
            self._drop_state(node, count=False)
            return freed

    @contextmanager
    def pinned(self, node: Node | None) -> Iterator[None]:
        """Keep `node`'s state from eviction while a row runs from it."""
        if node is None:
            yield
            return
        with self._lock:
            node.pins += 1
        try:
            yield
        finally:
            with self._lock:
                node.pins -= 1

    # -- memory --------------------------------------------------------------------------------
    def _evict_to_budget(self, keep: Node | None = None) -> None:
        if self._bytes <= self.budget_bytes:
            return
        stored = [n for n in self._nodes() if n.state is not None and n.pins == 0 and n is not keep]
        stored.sort(key=lambda n: (not n.checkpoint, bool(n.children), n.last_used))  # checkpoints, leaves, oldest
        for node in stored:
            if self._bytes <= self.budget_bytes:
                break
            self._drop_state(node)

    def _drop_state(self, node: Node, count: bool = True) -> None:
        self._bytes -= node.state.nbytes
        self._states -= 1
        if count:
            self._counts["evictions"] += 1
            self._counts["evicted_bytes"] += node.state.nbytes
        node.state = None
        while node.parent is not None and not node.children and node.state is None and node.pins == 0:
            del node.parent.children[node.edge[0]]  # prune the branch that holds nothing
            node = node.parent
        if node.parent is None and not node.children:  # an empty namespace goes too
            for key in [k for k, root in self._roots.items() if root is node]:
                del self._roots[key]

    def _nodes(self) -> Iterator[Node]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def clear(self) -> None:
        with self._lock:
            self._roots.clear()
            self._bytes = self._states = 0

    def drop_namespace(self, namespace: str) -> None:
        """Forget a namespace's states (a session that ended); nothing when it shares the root."""
        if self._shares(namespace):
            return
        with self._lock:
            root = self._roots.pop(namespace, None)
            if root is None:
                return
            stack = [root]
            while stack:
                node = stack.pop()
                if node.state is not None:
                    self._bytes -= node.state.nbytes
                    self._states -= 1
                    node.state = None
                stack.extend(node.children.values())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            c = self._counts
            checkpoints = [n.state.nbytes for n in self._nodes() if n.state is not None and n.checkpoint]
            return {"states": self._states, "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                    "checkpoints": len(checkpoints), "checkpoint_bytes": sum(checkpoints),
                    "shared": self.shared, "namespaces": len(self._roots),
                    "hit_rate": c["hits"] / c["lookups"] if c["lookups"] else 0.0,
                    "token_hit_rate": c["hit_tokens"] / c["looked_up_tokens"] if c["looked_up_tokens"] else 0.0,
                    **c}
