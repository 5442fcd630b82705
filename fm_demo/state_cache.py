"""The recurrent states one conversation keeps (the conversation itself: sessions.py).

A StateCache holds states that each hold exactly a prefix of the conversation's token transcript:
    live         the state after the whole transcript, on the model's device, while it is hot;
    snapshots    {position: state}: every turn boundary, plus the point just before the last
                 reply's first token (so retry reads one token), moved to CPU between replies.
Invariant: every snapshot at position p equals the state after reading token_ids[:p], and the
live state equals the state after reading token_ids[:live.seqlen]. The conversation keeps it by
dropping the states past a change (truncate, clear) before it changes tokens; nearest() hands the
live state to the caller, which advances it and gives it back through commit().

Any position is served from the nearest cached state at or before it, prefilling only the tokens
after it; with nothing cached (evicted by the store) the same code rebuilds the state from the
tokens by chunked prefill. Snapshots are never modified in place, so copies may share them.
The cache takes no lock: its conversation serialises every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .engine import Engine, State

if TYPE_CHECKING:
    from .models import LoadedModel

ProgressFn = Callable[[int, int], None]


def _clone_to(state: State, device: torch.device | str) -> State:
    """A copy of `state` on `device` (State.to shares storage when the device does not change)."""
    return state.clone() if state.device == torch.device(device) else state.to(device)


class StateCache:
    def __init__(self) -> None:
        self.live: State | None = None
        self.snapshots: dict[int, State] = {}

    def nbytes(self) -> int:
        live = self.live.nbytes if self.live is not None else 0
        return live + sum(s.nbytes for s in self.snapshots.values())

    def device_bytes(self) -> int:
        states = [*self.snapshots.values()] + ([self.live] if self.live is not None else [])
        return sum(s.nbytes for s in states if s.device.type != "cpu")

    def copy(self) -> StateCache:
        """An independent cache; snapshots are shared (they are never modified in place)."""
        other = StateCache()
        other.snapshots = dict(self.snapshots)
        other.live = self.live.clone() if self.live is not None else None
        return other

    def clear(self) -> None:
        self.snapshots, self.live = {}, None

    def truncate(self, pos: int) -> None:
        """Forget cached states beyond token position `pos`."""
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= pos}
        if self.live is not None and self.live.seqlen > pos:
            self.live = None

    def trim(self, level: int, keep: set[int]) -> int:
        """Free memory; level 1 keeps the live state and the snapshots at `keep`, level 2 drops all.

        Returns the bytes freed.
        """
        before = self.nbytes()
        if level >= 2:
            self.clear()
        else:
            self.snapshots = {p: s for p, s in self.snapshots.items() if p in keep}
        return before - self.nbytes()

    def at(self, pos: int) -> State | None:
        """The cached state holding exactly tokens[:pos], if there is one (not a copy)."""
        state = self.snapshots.get(pos) or self.live
        return state if state is not None and state.seqlen == pos else None

    def add(self, state: State) -> None:
        """Keep a CPU copy of `state` as the snapshot at its position (state.seqlen)."""
        self.snapshots[state.seqlen] = state.to("cpu")

    def nearest(self, pos: int, device: torch.device | str, engine: Engine) -> tuple[int, State]:
        """(start, a state on `device` holding tokens[:start]) from the latest cached state <= pos.

        The live state is taken over (the caller advances it); snapshots are copied (shared, never
        modified in place); with nothing cached, a fresh state (start 0).
        """
        start, state = 0, None
        if self.live is not None and self.live.seqlen <= pos:
            start, state, self.live = self.live.seqlen, self.live.to(device), None
        cached = [p for p in self.snapshots if p <= pos]
        if cached and max(cached) > start:
            start = max(cached)
            state = _clone_to(self.snapshots[start], device)
        return start, state if state is not None else engine.new_state(device=device)

    def provide(self, lm: LoadedModel, tokens: list[int], boundaries: list[int], pos: int,
                progress: ProgressFn | None) -> tuple[int, State]:
        """(start, a state holding tokens[:pos]), read by the model's runner from the cached one at start.

        Snapshots are taken at every boundary passed and at `pos` itself; a `one_call` runner
        (ZeroGPU) reads everything in one call and only the state at `pos` is kept.
        """
        runner = lm.runner
        start, state = self.nearest(pos, runner.state_device, lm.engine)
        cuts = {pos} if runner.one_call else {b for b in boundaries if start < b < pos} | {pos}
        done = start
        for cut in sorted(cuts):
            if cut > done:
                ids = torch.tensor([tokens[done:cut]])
                offset = done - start
                state = runner.prefill(state, ids, progress and (
                    lambda d, t, o=offset: progress(o + d, pos - start)))
                done = cut
            if cut not in self.snapshots:
                self.snapshots[cut] = _clone_to(state, runner.state_device)
        return start, state

    def commit(self, state: State | None, end: int, keep: set[int]) -> None:
        """Keep `state` (after a reply, holding tokens[:end]) and only the snapshots at `keep`."""
        if state is None or state.seqlen != end:  # an error mid-step: rebuild from snapshots later
            self.live = None
        elif state.device.type == "cpu":
            self.snapshots[end], self.live = state, None
        else:
            self.snapshots[end], self.live = state.to("cpu"), state
        self.snapshots = {p: s for p, s in self.snapshots.items() if p in keep and p <= end}
        self.settle()

    def settle(self) -> None:
        """Snapshots wait on CPU between replies; only the hot state stays on the device."""
        self.snapshots = {p: s if s.device.type == "cpu" else s.to("cpu") for p, s in self.snapshots.items()}

    def offload(self) -> int:
        """Move the hot state off the GPU (its copy at the end of the transcript is on CPU)."""
        if self.live is None or self.live.device.type == "cpu":
            return 0
        if self.live.seqlen not in self.snapshots:
            self.snapshots[self.live.seqlen] = self.live.to("cpu")
        freed, self.live = self.live.nbytes, None
        return freed

    def offload_all(self) -> None:
        if self.live is not None and self.live.device.type != "cpu":
            self.snapshots[self.live.seqlen] = self.live.to("cpu")
        self.live = None
