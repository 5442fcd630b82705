"""Stop strings: the incremental scan finds what a whole-text search finds, and a reply's cost per
token does not grow with the stops a client sends or with its context."""

from __future__ import annotations

import random
import time

import pytest

from fm_demo.engine import SamplingParams
from fm_demo.models import ModelManager
from fm_demo.serving.completion import CompletionRequest, complete
from fm_demo.settings import Settings
from fm_demo.stops import MAX_STOP_CHARS, MAX_STOPS, first_stop, partial_stop


def naive_first(text: str, stops) -> int:
    return min((text.find(s) for s in stops if s in text), default=-1)


def naive_partial(text: str, stops) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@pytest.mark.parametrize("seed", range(200))
def test_incremental_scan_and_tail_hold_back_equal_the_whole_text_answers(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    text, scanned = "", 0
    for _ in range(rng.randint(1, 30)):
        text += "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        hit = first_stop(text, stops, scanned)
        assert hit == naive_first(text, stops), (text, stops, scanned)
        if hit >= 0:
            break
        assert partial_stop(text, stops) == naive_partial(text, stops), (text, stops)
        scanned = len(text)


@pytest.fixture(scope="module")
def lm():
    return ModelManager(Settings(device="cpu")).get("tiny-base")


def per_token_s(lm, prompt: list[int], sampling: SamplingParams, stops: tuple[str, ...], tokens: int) -> float:
    """Seconds per token after the first, as the consumer of a completion sees them."""
    req = CompletionRequest(prompt, sampling, tokens, (), stops, "stops-test")
    times = [time.perf_counter() for chunk in complete(lm, req) if chunk.finish_reason is None]
    return (times[-1] - times[0]) / (len(times) - 1)


def test_sixteen_long_stops_and_a_100k_token_context_cost_no_more_per_token(lm):
    """The client's worst: MAX_STOPS stops of MAX_STOP_CHARS in all that never match, and a
    repetition penalty over a 100k-token context, against the same reply without either."""
    rng = random.Random(0)
    prompt = [rng.randrange(3, 2000) for _ in range(100_000)]
    stops = tuple("".join(rng.choice("QXZJ") for _ in range(MAX_STOP_CHARS // MAX_STOPS)) for _ in range(MAX_STOPS))
    plain, heavy = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1,
                                                                           repetition_penalty=1.3)
    per_token_s(lm, prompt, plain, (), 4)  # reads the prompt once; later requests find its state
    ratios = []
    for _ in range(3):
        base = per_token_s(lm, prompt, plain, (), 200)
        worst = per_token_s(lm, prompt, heavy, stops, 200)
        ratios.append(worst / base)
    assert min(ratios) <= 1.2, ratios


def test_the_api_refuses_stops_beyond_their_caps():
    from fm_demo.ui.openai_schema import ApiError, parse_completion

    body = {"model": "tiny-base", "prompt": "hi"}
    with pytest.raises(ApiError, match="at most 1024 characters"):
        parse_completion({**body, "stop": ["x" * 20_000] * 16}, Settings(device="cpu"))
    with pytest.raises(ApiError, match="at most 16 strings"):
        parse_completion({**body, "stop": ["x"] * 17}, Settings(device="cpu"))
    assert parse_completion({**body, "stop": ["x" * 64] * 16}, Settings(device="cpu")).stop
