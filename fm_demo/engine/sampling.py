"""Token sampling as small pure functions over logits [B, V], and the rules sampling settings obey.

Order of application follows transformers' generate: repetition penalty, temperature, top-k,
top-p, then a draw (or argmax when temperature is 0).

LIMITS is the one table of what each SamplingParams field accepts; every entry point (the UI, the
gradio_client endpoints and MCP tools, the OpenAI-compatible API, the cluster's requests) builds a
SamplingParams from what it was sent and reports the SamplingError it raises in its own shape, so
the rules and their messages are the same everywhere. Within those limits sample() never raises.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

RANDOM_SEED = -1  # what the UI and the gradio_client endpoints send for "draw a random seed"


@dataclass(frozen=True)
class Limit:
    """What one field accepts: a number of `kind` from lo to hi (lo excluded when `open_lo`), or
    0 besides when `zero` (temperature 0 means greedy)."""

    kind: type  # int or float
    lo: float
    hi: float
    open_lo: bool = False
    zero: bool = False

    def allows(self, value: float) -> bool:
        if self.zero and value == 0:
            return True
        return (value > self.lo if self.open_lo else value >= self.lo) and value <= self.hi

    def describe(self) -> str:
        if self.kind is int:
            what, span = "an integer", f"from {self.lo} to {self.hi}"
        elif self.open_lo:
            what, span = "a number", f"greater than {self.lo:g} and at most {self.hi:g}"
        else:
            what, span = "a number", f"from {self.lo:g} to {self.hi:g}"
        return f"{what}: 0 (greedy) or {span}" if self.zero else f"{what} {span}"


# Why these bounds: sample() computes in float32, where a temperature or penalty below ~1e-38
# rounds to 0 (logits / 0 and -inf * 0 give nan) and a value near 1e-45 turns every logit into
# inf. 0.01 is far from that and already nearly as sharp as greedy; past a temperature
# of 10 or a penalty of 100 the distribution or the penalized tokens change no further in any
# useful way. top_p needs no floor: the most likely token is always kept, so any p > 0 works.
# Every top_k at or above the vocabulary's size keeps every token; the cap keeps it a 32-bit int
# for whatever tensor it lands in. A seed is what torch.Generator.manual_seed takes, non-negative
# (the entry points' "random" is None or RANDOM_SEED, not any negative number).
LIMITS: dict[str, Limit] = {
    "temperature": Limit(float, 0.01, 10.0, zero=True),
    "top_k": Limit(int, 0, 2**31 - 1),
    "top_p": Limit(float, 0.0, 1.0, open_lo=True),
    "repetition_penalty": Limit(float, 0.01, 100.0),
    "seed": Limit(int, 0, 2**63 - 1),
}


class SamplingError(ValueError):
    """A sampling setting outside LIMITS; `field` names it, the message gives value and range."""

    def __init__(self, field: str, value: object, limit: Limit):
        super().__init__(f"{field} must be {limit.describe()}, got {value!r}")
        self.field, self.value = field, value


def checked(field: str, value: object, limit: Limit | None = None) -> int | float:
    """`value` as its field's kind when `limit` (by default LIMITS[field]) allows it, else
    SamplingError. Bools and strings are no numbers; a float that is a whole number is accepted
    for an integer field, as JSON and Gradio's sliders carry integers as floats."""
    limit = limit or LIMITS[field]
    number = _as_kind(value, limit.kind)
    if number is None or not limit.allows(number):
        raise SamplingError(field, value, limit)
    return number


def _as_kind(value: object, kind: type) -> int | float | None:
    """`value` as a finite int or float, or None when it is no such number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):  # exact, however large (math.isfinite would overflow)
        number: int | float = int(value)
    else:
        number = float(value)
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            return None
    if kind is int:
        return int(number)
    try:
        return float(number)
    except OverflowError:  # an int beyond float's range: no float field allows it anyway
        return None


def narrowed(field: str, hi: float) -> Limit:
    """LIMITS[field] with a lower cap: an API whose own documented range is narrower (OpenAI's
    temperature is at most 2) states it in the same words."""
    limit = LIMITS[field]
    return replace(limit, hi=min(hi, limit.hi))


def seed_or_random(value: object) -> object:
    """None (a random seed) for RANDOM_SEED, else the value, for SamplingParams to check."""
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and value == RANDOM_SEED:
        return None
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn; construction checks every field against LIMITS (SamplingError) and
    stores it as its field's kind (a temperature of 1 becomes 1.0, a top_k of 5.0 becomes 5)."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None  # fixes the draw so a reply can be reproduced

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (f.name == "seed" and value is None):
                object.__setattr__(self, f.name, checked(f.name, value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def revalidated(params: SamplingParams) -> SamplingParams:
    """`params` checked again: an unpickled SamplingParams (how a cluster request arrives) was
    never constructed, so its __post_init__ never ran."""
    return SamplingParams(**{f.name: getattr(params, f.name) for f in fields(params)})


def apply_repetition_penalty(logits: Tensor, prev_ids: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive, multiply negative logits of seen tokens.

    logits: [B, V]; prev_ids: [B, S] token ids already in the context.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, prev_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, prev_ids, seen)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def shifted(logits: Tensor) -> Tensor:
    """Float32 logits [B, V] moved so each row's largest is exactly 0, which no temperature,
    filter or softmax can then turn into inf or nan (finite logits of any size, -inf from masking).

    Rows holding +inf (a huge logit divided by a small penalty) keep just those tokens, equally
    likely; rows with nothing above -inf (nan counts as -inf) make every token equally likely,
    as nothing tells them apart, so a draw from any row succeeds.
    """
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    top = logits.amax(-1, keepdim=True)
    infinite = torch.where(logits == float("inf"), 0.0, float("-inf"))
    out = torch.where(top == float("inf"), infinite, logits - top)
    return torch.where(top == float("-inf"), torch.zeros_like(out), out)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2019): the smallest set of tokens whose mass reaches p.

    The most likely token is always kept: by position, not by comparing its mass before (0) with
    p, since a tiny p (1e-300) compares as 0 against float32 and would drop every token.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           prev_ids: Tensor | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V] (any float dtype); never raises for checked params."""
    logits = logits.float()
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = apply_temperature(shifted(logits), params.temperature)
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g
