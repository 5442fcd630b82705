"""Time to first token per chat turn: the cached recurrent state vs re-encoding the whole history.

    python bench/multiturn.py --json            # tiny instruct model on CPU, 30 turns
    python bench/multiturn.py --quick --json    # 4 turns, 2 runs each: a smoke run (the same keys)
    python bench/multiturn.py --preset 7b-instruct --device cuda --json

Cached: a Conversation reads only the new turn's tokens on top of the state it kept.
Re-encode: what the playground Space and ChatInterface apps do each turn, i.e. read the whole
transcript again from an empty state (same engine, same chunked prefill, same tokens), then
produce the first token. Each figure is the best of --repeats runs (the cached one on forks of
the conversation, so every run starts from the same state).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm_demo import chat  # noqa: E402
from fm_demo.conversations.sessions import Conversation  # noqa: E402
from fm_demo.engine import SamplingParams  # noqa: E402
from fm_demo.models import ModelManager  # noqa: E402
from fm_demo.settings import Preset, Settings  # noqa: E402

TOPICS = ["falcons", "deserts", "the sea", "mountains", "rivers", "cities", "forests", "the moon",
          "numbers", "music"]


def user_message(turn: int) -> str:
    """Messages of near-equal length, so every turn adds about the same number of tokens."""
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn + 1}. Here is a note about {topic}: it is a long and calm day, the wind is soft, "
            f"and we talk about {topic} again and again, with many small details about colors, "
            f"sounds, places and names, so that the story keeps growing. What do you think about {topic}?")


def reencode_ttft(lm, ids: list[int], sampling: SamplingParams, stops: set[int]) -> tuple[float, int]:
    """(seconds to the first token, that token) reading `ids` from an empty state."""
    t0 = time.perf_counter()
    stream = lm.engine.stream(torch.tensor([ids]), lm.engine.new_state(), sampling, 1, stops, lm.tokenizer)
    ev = next(stream)
    ttft = time.perf_counter() - t0
    stream.close()
    return ttft, ev.token_id


def cached_ttft(conv: Conversation, text: str, sampling: SamplingParams, max_new: int) -> tuple[float, int]:
    """(time to first token, first token) of `text` on a fork of `conv` (left as it was)."""
    probe = conv.fork()
    gen = probe.send(text, sampling, max_new)
    first = next(gen)
    gen.close()
    return first.metrics.ttft_s, probe.turns[-1].reply_ids[0]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    settings = Settings(device=args.device, max_new_tokens=args.max_new_tokens)
    presets = None
    if args.checkpoint:  # a local instruct checkpoint instead of a preset
        presets = {"local": Preset("local", args.checkpoint, args.checkpoint, "instruct", ("fp32", "bf16"), "fp32")}
    lm = ModelManager(settings, presets=presets).get("local" if presets else args.preset)
    conv, sampling = Conversation(lm, settings), SamplingParams()
    stops = chat.stop_token_ids(conv.fmt, lm.tokenizer, lm.model.generation_config.eos_token_id)
    out = {"ttft_cached_s": [], "ttft_reencode_s": [], "history_tokens": [], "prompt_tokens": [],
           "first_token_match": True}
    for turn in range(args.turns):
        text, history = user_message(turn), conv.context_tokens
        cached = [cached_ttft(conv, text, sampling, args.max_new_tokens) for _ in range(args.repeats - 1)]
        events = list(conv.send(text, sampling, args.max_new_tokens))
        cached.append((events[-1].metrics.ttft_s, conv.turns[-1].reply_ids[0]))
        prompt_end = conv.context_tokens - len(conv.turns[-1].reply_ids)
        ids = conv.token_ids()[:prompt_end]
        fresh = [reencode_ttft(lm, ids, sampling, stops) for _ in range(args.repeats)]
        out["first_token_match"] &= {t for _, t in cached} == {t for _, t in fresh}
        out["ttft_cached_s"].append(min(s for s, _ in cached))
        out["ttft_reencode_s"].append(min(s for s, _ in fresh))
        out["history_tokens"].append(history)
        out["prompt_tokens"].append(len(conv.turns[-1].prompt_ids))
    c, r = out["ttft_cached_s"], out["ttft_reencode_s"]
    out.update(model=lm.label, device=lm.device, threads=args.threads, repeats=args.repeats,
               final_history_tokens=conv.context_tokens, cached_last_over_first=c[-1] / c[0],
               reencode_over_cached_last=r[-1] / c[-1],
               targets_met={"cached_last_le_1.2x_first": c[-1] <= 1.2 * c[0],
                            "reencode_ge_5x_cached_at_last": r[-1] >= 5 * c[-1],
                            "history_ge_3k": out["history_tokens"][-1] >= 3000})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-instruct")
    p.add_argument("--checkpoint", help="a local instruct checkpoint directory instead of --preset")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest for tiny models)")
    p.add_argument("--quick", action="store_true", help="--turns 4 --repeats 2 --max-new-tokens 8 (a smoke run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.repeats, args.max_new_tokens = 4, 2, 8
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['model']} on {out['device']}")
    print(f"{'turn':>4} {'history':>8} {'cached ms':>10} {'re-encode ms':>13}")
    for i, (h, c, r) in enumerate(zip(out["history_tokens"], out["ttft_cached_s"], out["ttft_reencode_s"])):
        print(f"{i + 1:>4} {h:>8} {c * 1e3:>10.2f} {r * 1e3:>13.2f}")
    print(json.dumps(out["targets_met"]))


if __name__ == "__main__":
    main()
