"""What one scheduler iteration does, decided without touching a tensor (scheduler.py runs it).

plan() takes the rows reading a prompt and the rows decoding, and returns a Plan: how many prompt
tokens each reading row reads now, and which rows join the batched decode step. It is a pure
function of plain values, so fairness can be tested without threads or a model.

Fair reading: while rows decode, the per-iteration budget of prompt tokens (a step's decode waits
for it) is shared shortest-remaining-first, so a short prompt that arrives during a 100k-token read
starts within about one piece's time; the row served first always gets at least one piece, so
every read moves. The budget grows with the rows waiting to join the batch per row already in it
(budget x ceil(reading / decoding)): a burst of new chats joins the batch within a few steps
(batching pays only once they decode) while one long read next to many streams still costs each
step one budget. With nothing decoding, every reading row reads up to a chunk per iteration.
Reads are whole pieces, cut where the row's own cuts fall (ReadingRow.cut_after), never where the
budget happens to end: a prompt is read the same way whatever else runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


class ReadingRow(Protocol):
    read: int  # prompt tokens in the state so far (absolute position)
    end: int  # prompt length

    def cut_after(self, pos: int) -> int:
        """The next position after `pos` where a piece of this prompt ends."""


@dataclass
class Plan:
    reads: list[tuple[ReadingRow, int]] = field(default_factory=list)  # (row, prompt tokens to read now)
    decode: list = field(default_factory=list)  # rows of this iteration's batched step, in slot order

    @property
    def read_tokens(self) -> int:
        return sum(n for _, n in self.reads)


def whole_pieces(row: ReadingRow, allowance: int, at_least_one: bool) -> int:
    """Tokens of the row's next whole pieces that fit in `allowance` (one piece regardless, if asked)."""
    pos, took = row.read, 0
    while pos < row.end:
        nxt = row.cut_after(pos)
        if took + nxt - pos > allowance and not (at_least_one and took == 0):
            break
        took, pos = took + nxt - pos, nxt
    return took


def plan(reading: Sequence[ReadingRow], decoding: Sequence, budget: int, chunk: int) -> Plan:
    """One iteration: shortest-remaining-first reads within `budget` while rows decode (a chunk
    per row otherwise), and every decoding row steps."""
    out = Plan(decode=list(decoding))
    if not decoding:
        for row in reading:
            if (n := whole_pieces(row, chunk, at_least_one=True)) > 0:
                out.reads.append((row, n))
        return out
    left = budget * -(-len(reading) // len(decoding))  # budget x ceil(reading / decoding)
    for row in sorted(reading, key=lambda r: r.end - r.read):  # stable: arrival order breaks ties
        n = whole_pieces(row, left, at_least_one=not out.reads)
        if n > 0:
            out.reads.append((row, n))
            left -= n
        if left <= 0:
            break
    return out
