"""The recurrent states one conversation uses (the conversation itself: sessions.py).

Snapshots live in the model's PrefixCache (serving/prefix_cache.py), a radix tree over token ids
shared by every request to that model; a conversation holds references into it, never copies:
    live         the state after the whole transcript, on the model's device, while it is hot;
    refs         {position: tree node}: every turn boundary, plus the point just before the last
                 reply's first token (so retry reads one token); the tree keeps them on CPU.
Invariant: every state found for position p equals the state after reading token_ids[:p], and the
live state equals the state after reading token_ids[:live.seqlen]. The conversation keeps it by
dropping the live state past a change (truncate, clear) before it changes tokens; nearest() hands
the live state to the caller, which advances it and gives it back through commit().

Any position is served from the nearest state at or before it: the live state, or the longest
prefix the tree holds in this conversation's namespace (its own snapshots, or, with sharing on,
anyone's with the same tokens), prefilling only the tokens after it. With nothing cached (evicted
under the byte budget) the same code rebuilds the state from the tokens by chunked prefill.
The cache takes no lock: its conversation serialises every call (the tree has its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..engine import Engine, State
from ..serving.prefix_cache import Node, PrefixCache

if TYPE_CHECKING:
    from ..models import LoadedModel

ProgressFn = Callable[[int, int], None]


def _clone_to(state: State, device: torch.device | str) -> State:
    """A copy of `state` on `device` (State.to shares storage when the device does not change)."""
    return state.clone() if state.device == torch.device(device) else state.to(device)


class StateCache:
    def __init__(self, tree: PrefixCache | None, namespace: str, tokens: Callable[[], list[int]]) -> None:
        self.tree = tree if tree is not None else PrefixCache(budget_bytes=0)
        self.namespace = namespace
        self._tokens = tokens  # the conversation's transcript now (keys for the tree)
        self.live: State | None = None
        self.refs: dict[int, Node] = {}

    @property
    def snapshots(self) -> dict[int, State]:
        """{position: state} of this conversation's snapshots still in the tree (not copies)."""
        out = {}
        for p, node in self.refs.items():
            if (state := self.tree.get(node)) is not None:
                out[p] = state
        return out

    def nbytes(self) -> int:
        live = self.live.nbytes if self.live is not None else 0
        return live + sum(s.nbytes for s in self.snapshots.values())

    def device_bytes(self) -> int:
        states = [*self.snapshots.values()] + ([self.live] if self.live is not None else [])
        return sum(s.nbytes for s in states if s.device.type != "cpu")

    def copy(self, tokens: Callable[[], list[int]]) -> StateCache:
        """An independent cache over the same tree (snapshots are shared: never modified in place)."""
        other = StateCache(self.tree, self.namespace, tokens)
        other.refs = {p: self.tree.hold(n) for p, n in self.refs.items()}
        other.live = self.live.clone() if self.live is not None else None
        return other

    def _keep_only(self, keep: Callable[[int], bool]) -> None:
        """Let go of the snapshots at positions `keep` rejects (the tree frees what nobody holds)."""
        for p in [p for p in self.refs if not keep(p)]:
            self.tree.release(self.refs.pop(p))

    def _ref(self, pos: int, node: Node) -> None:
        if self.refs.get(pos) is not node:
            if pos in self.refs:
                self.tree.release(self.refs[pos])
            self.refs[pos] = self.tree.hold(node)

    def clear(self) -> None:
        self._keep_only(lambda p: False)
        self.live = None

    def truncate(self, pos: int) -> None:
        """Forget this conversation's states beyond token position `pos`."""
        self._keep_only(lambda p: p <= pos)
        if self.live is not None and self.live.seqlen > pos:
            self.live = None

    def trim(self, level: int, keep: set[int]) -> int:
        """Free memory; level 1 keeps the live state and the snapshots at `keep`, level 2 drops all.

        Then the tree frees every state of this namespace that no conversation (a fork) holds,
        unless it is shared (then its budget decides).
        Returns the bytes freed.
        """
        before = self.nbytes()
        self._keep_only(lambda p: level < 2 and p in keep)
        self.tree.discard_unheld(self.namespace)
        if level >= 2:
            self.live = None
        return before - self.nbytes()

    def at(self, pos: int) -> State | None:
        """The cached state holding exactly tokens[:pos], if there is one (not a copy)."""
        state = self.tree.get(self.refs.get(pos))
        if state is None:
            n, node = self.tree.find(self._tokens()[:pos], self.namespace)
            state = self.tree.get(node) if n == pos else None
        if state is None and self.live is not None and self.live.seqlen == pos:
            state = self.live
        return state

    def add(self, state: State) -> None:
        """Keep `state` as the snapshot at its position (state.seqlen); the tree takes a CPU copy."""
        pos = state.seqlen
        self._ref(pos, self.tree.insert(self._tokens()[:pos], _clone_to(state, self.tree.device), self.namespace))

    def _keep(self, state: State) -> None:
        """Keep `state` itself as the snapshot at its position (it is not modified afterwards)."""
        pos = state.seqlen
        self._ref(pos, self.tree.insert(self._tokens()[:pos], state, self.namespace))

    def nearest(self, pos: int, device: torch.device | str, engine: Engine) -> tuple[int, State]:
        """(start, a state on `device` holding tokens[:start]) from the latest cached state <= pos.

        The live state is taken over (the caller advances it); tree states are copied (shared,
        never modified in place); with nothing cached, a fresh state (start 0).
        """
        start, state, _ = self._resume(pos, device, engine)
        return start, state

    def _resume(self, pos: int, device: torch.device | str, engine: Engine) -> tuple[int, State, Node | None]:
        """nearest(), plus the tree node the state was copied from (None: live or fresh)."""
        start, state, found = 0, None, None
        if self.live is not None and self.live.seqlen <= pos:
            start, state, self.live = self.live.seqlen, self.live.to(device), None
        n, node = self.tree.find(self._tokens()[:pos], self.namespace, count=True)
        if n > start:
            start, state, found = n, _clone_to(node.state, device), node
        return start, state if state is not None else engine.new_state(device=device), found

    def provide(self, lm: LoadedModel, tokens: list[int], boundaries: list[int], pos: int,
                progress: ProgressFn | None) -> tuple[int, State]:
        """(start, a state holding tokens[:pos]), read by the model's runner from the cached one at start.

        Snapshots are taken at every boundary passed and at `pos` itself; a `one_call` runner
        (ZeroGPU) reads everything in one call and only the state at `pos` is kept.
        """
        runner = lm.runner
        start, state, node = self._resume(pos, runner.state_device, lm.engine)
        if node is not None and start in boundaries:  # resumed from a state another request left:
            self._ref(start, node)  # hold it too (a no-op when it is already this conversation's)
        cuts = {pos} if runner.one_call else {b for b in boundaries if start < b < pos} | {pos}
        done = start
        for cut in sorted(cuts):
            if cut > done:
                ids = torch.tensor([tokens[done:cut]])
                offset = done - start
                state = runner.prefill(state, ids, progress and (
                    lambda d, t, o=offset: progress(o + d, pos - start)))
                done = cut
            if self.tree.get(self.refs.get(cut)) is None:
                self.add(state)
        return start, state

    def commit(self, state: State | None, end: int, keep: set[int]) -> None:
        """Keep `state` (after a reply, holding tokens[:end]) and only the snapshots at `keep`."""
        if state is None or state.seqlen != end:  # an error mid-step: rebuild from snapshots later
            self.live = None
        elif state.device == self.tree.device:
            self._keep(state)
            self.live = None
        else:
            self.add(state)
            self.live = state
        self._keep_only(lambda p: p in keep and p <= end)

    def offload(self) -> int:
        """Move the hot state off the GPU (its copy at the end of the transcript is in the tree)."""
        if self.live is None or self.live.device.type == "cpu":
            return 0
        if self.tree.get(self.refs.get(self.live.seqlen)) is None:
            self.add(self.live)
        freed, self.live = self.live.nbytes, None
        return freed

    def offload_all(self) -> None:
        if self.live is not None and self.live.device.type != "cpu":
            self.offload()
        self.live = None
