"""Stop strings at text level, for a reply that streams: where one starts, and how much of the
tail to hold back because it could still become one.

The cost per token must not grow with what a client sends or with the reply's length: a stop
string can only start in the last (longest stop - 1) characters of what was already scanned, so
`first_stop` takes where the previous scan ended and looks no further back; `partial_stop` looks
only at the tail as long as each stop, trying only the places where that stop's first character
occurs. The API caps the stops' number and total length (MAX_STOPS, MAX_STOP_CHARS), so both are
bounded per token whatever the context.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOPS = 16  # stop strings one request may send
MAX_STOP_CHARS = 1024  # their total length


def first_stop(text: str, stops: Sequence[str], scanned: int = 0) -> int:
    """Index of the earliest stop string in `text`, or -1; `scanned`: the length of a prefix of
    `text` already searched without a hit (only stops that end after it are looked for)."""
    return min((i for s in stops if (i := text.find(s, max(0, scanned - len(s) + 1))) >= 0), default=-1)


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        if len(s) < 2:
            continue
        tail = text[-(len(s) - 1):]
        i = tail.find(s[0])
        while 0 <= i and len(tail) - i > best:  # leftmost match first: the longest suffix
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
