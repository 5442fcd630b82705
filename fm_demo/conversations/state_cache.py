"""The states one conversation holds (the conversation itself: sessions.py).

Every state lives in the model's PrefixCache (serving/prefix_cache.py), a radix tree over token
ids shared by every request to that model: the scheduler reads each request from the longest
prefix the tree holds and keeps states where the conversation asks (its turn boundaries, a
document's end, the point just before the last reply's first token, the end of the reply). The
conversation holds references to those nodes, never copies:
    refs   {position: tree node}
so its memory can be counted, trimmed and freed, and so it knows where it expects a state (a
held node the tree evicted makes the next reply a cache miss: it is read again, and says so).
Invariant: every state found for position p equals the state after reading token_ids[:p].
The cache takes no lock: its conversation serialises every call (the tree has its own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..engine import State
from ..serving.prefix_cache import Node, PrefixCache


class StateCache:
    def __init__(self, tree: PrefixCache | None, namespace: str, tokens: Callable[[], list[int]]) -> None:
        self.tree = tree if tree is not None else PrefixCache(budget_bytes=0)
        self.namespace = namespace
        self._tokens = tokens  # the conversation's transcript now (keys for the tree)
        self.refs: dict[int, Node] = {}
        self.known: set[int] = set()  # positions held since the transcript last changed there (trim keeps them)

    @property
    def snapshots(self) -> dict[int, State]:
        """{position: state} of this conversation's states still in the tree (not copies)."""
        out = {}
        for p, node in self.refs.items():
            if (state := self.tree.get(node)) is not None:
                out[p] = state
        return out

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.snapshots.values())

    def device_bytes(self) -> int:
        return sum(s.nbytes for s in self.snapshots.values() if s.device.type != "cpu")

    def expected(self, pos: int) -> int:
        """The furthest position <= pos where this conversation had a state (0: none): what the
        next request should resume from. Fewer found means memory pressure evicted it (a cache
        miss), not that the conversation never had it."""
        return max((p for p in self.known if p <= pos), default=0)

    def copy(self, tokens: Callable[[], list[int]]) -> StateCache:
        """An independent cache over the same tree (states are shared: never modified in place)."""
        other = StateCache(self.tree, self.namespace, tokens)
        other.refs = {p: self.tree.hold(n) for p, n in self.refs.items()}
        other.known = set(self.known)
        return other

    def hold(self, kept: Mapping[int, Node], keep: set[int], reach: int = -1) -> None:
        """Hold the nodes a request kept at `keep` positions and let go of every other position.
        The positions of `keep` up to `reach` (where the request's state ended, as far as the
        transcript goes) are expected to have a state from now on, held here or not (a runner in
        another process may keep it)."""
        for pos, node in kept.items():
            if pos in keep and self.refs.get(pos) is not node:
                if pos in self.refs:
                    self.tree.release(self.refs[pos])
                self.refs[pos] = self.tree.hold(node)
        self._keep_only(lambda p: p in keep)
        self.known = {p for p in self.known if p in keep} | {p for p in keep if p <= reach} | set(self.refs)

    def split(self, pos: int, share: bool) -> tuple[dict[int, Node], set[int]]:
        """The states beyond position `pos` and the positions beyond it where one is expected, for
        a branch to keep: held again when `share` (this cache keeps them too), else they leave it."""
        refs = {p: n for p, n in self.refs.items() if p > pos}
        known = {p for p in self.known if p > pos}
        if share:
            refs = {p: self.tree.hold(n) for p, n in refs.items()}
        else:
            for p in refs:
                del self.refs[p]
            self.known -= known
        return refs, known

    def attach(self, refs: dict[int, Node], known: set[int]) -> None:
        """Take over a branch's states (split's result): their holds pass to this cache."""
        for p, node in refs.items():
            if p in self.refs:
                self.tree.release(self.refs[p])
            self.refs[p] = node
        self.known |= known | set(refs)

    def release(self, refs: dict[int, Node]) -> None:
        """Let go of states a branch held (a branch that is dropped)."""
        for node in refs.values():
            self.tree.release(node)

    def _keep_only(self, keep: Callable[[int], bool]) -> None:
        """Let go of the states at positions `keep` rejects (the tree frees what nobody holds)."""
        for p in [p for p in self.refs if not keep(p)]:
            self.tree.release(self.refs.pop(p))

    def clear(self) -> None:
        self._keep_only(lambda p: False)
        self.known.clear()

    def invalidate(self, end: int) -> None:
        """The tokens changed under the states (another system prompt, another model): let go of
        every state, but expect one at `end`, so the next reply says it read the history again."""
        self.clear()
        self.known = {end} if end else set()

    def truncate(self, pos: int) -> None:
        """Forget this conversation's states beyond token position `pos`."""
        self._keep_only(lambda p: p <= pos)
        self.known = {p for p in self.known if p <= pos}

    def trim(self, level: int, keep: set[int]) -> int:
        """Free memory; level 1 keeps the states at `keep`, level 2 drops all. Then the tree frees
        every state of this namespace that no conversation (a fork) holds, unless it is shared
        (then its budget decides). Returns the bytes freed."""
        before = self.nbytes()
        self._keep_only(lambda p: level < 2 and p in keep)
        self.tree.discard_unheld(self.namespace)
        return before - self.nbytes()

    def at(self, pos: int) -> State | None:
        """The cached state holding exactly tokens[:pos], if there is one (not a copy)."""
        state = self.tree.get(self.refs.get(pos))
        if state is None:
            n, node = self.tree.find(self._tokens()[:pos], self.namespace)
            state = self.tree.get(node) if n == pos else None
        return state

    def add(self, state: State) -> None:
        """Keep `state` as this conversation's state at its position (state.seqlen); the tree
        takes a copy on its own device (an imported conversation's state: its namespace is
        private, so no other conversation finds it)."""
        pos = state.seqlen
        copy = state.clone() if state.device == self.tree.device else state.to(self.tree.device)
        self.hold({pos: self.tree.insert(self._tokens()[:pos], copy, self.namespace)}, {*self.refs, pos})
