"""What the API's extra features cost, on the bundled tiny instruct model through the scheduler
the app serves it with. Prints JSON.

    python bench/api.py --json
    python bench/api.py --quick --json     # smaller prompts and fewer tokens (seconds; the same keys)

- constrained: decode tok/s per row with a JSON-schema constraint (a grammar's token mask in every
  step, engine/constraints.py) against the same rows unconstrained, at batch 1 and 16 (16 rows
  sampled at temperature 1 with their own seeds; every row runs to max_new_tokens: the schema asks
  for a long array, the unconstrained rows have no stop token). Per row: its own decode rate
  (StreamMetrics.decode_tok_s), averaged over rows. ratio_b16 = unconstrained / constrained.
- n: one request with n=8 against n=1 for the same ~2k-token prompt (no prefix cache): time to
  first token (n=8: when the last of the eight first tokens came), and the prompt tokens the
  scheduler read for n=8 (its prefill_tokens counter), against the prompt's length.
- echo: scoring a prompt (Request.prompt_logprobs, what /v1/completions echo + logprobs runs) of
  32k tokens against one of 1k, each in a fresh process: the process's peak resident bytes
  (ru_maxrss) after the model is loaded and one small prompt scored, then after the prompt.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fm_demo.engine import DecodeOptions, SamplingParams  # noqa: E402
from fm_demo.engine.constraints import compile_grammar  # noqa: E402
from fm_demo.models import ModelManager  # noqa: E402
from fm_demo.serving import Request, Scheduler  # noqa: E402
from fm_demo.settings import Settings  # noqa: E402

MODEL = "tiny-instruct"
SCHEMA = {"type": "object", "properties": {"readings": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
          "required": ["readings"], "additionalProperties": False}
FULL = {"max_new": 128, "rows": 16, "n_prompt": 2048, "echo": (1024, 32768)}
QUICK = {"max_new": 24, "rows": 16, "n_prompt": 256, "echo": (1024, 4096)}


def load():
    return ModelManager(Settings(device="cpu")).get(MODEL)


def prompt_ids(lm, tokens: int) -> list[int]:
    line = "The falcon glides over the desert at dawn, and the river keeps its slow course. "
    ids = lm.tokenizer.encode(line * (tokens // 8 + 1), add_special_tokens=False)
    return ids[:tokens]


def decode_rates(sched: Scheduler, lm, rows: int, max_new: int, grammar) -> float:
    """Mean per-row decode tok/s of `rows` rows submitted together."""
    ids = prompt_ids(lm, 32)
    replies = [sched.submit(Request(ids, sampling=SamplingParams(temperature=1.0, seed=i), max_new_tokens=max_new,
                                    cache=False, options=DecodeOptions(grammar=grammar))) for i in range(rows)]
    for r in replies:
        for _ in r.tokens():
            pass
    return sum(r.metrics.decode_tok_s for r in replies) / rows


def constrained(lm, p: dict) -> dict:
    stops = (lm.tokenizer.eos_token_id,)
    grammar = compile_grammar("json_schema", SCHEMA, lm.tokenizer, lm.engine.config.vocab_size, stops)
    sched = Scheduler(lm.engine, max_batch=p["rows"], prefill_budget=256, max_waiting=p["rows"])
    try:
        decode_rates(sched, lm, 2, 8, grammar)  # warm-up
        out = {}
        for b, key in ((1, "b1"), (p["rows"], "b16")):
            best_c = best_u = 0.0
            for _ in range(2):  # interleaved, best of two: the machine is shared
                best_u = max(best_u, decode_rates(sched, lm, b, p["max_new"], None))
                best_c = max(best_c, decode_rates(sched, lm, b, p["max_new"], grammar))
            out[f"tok_s_{key}"], out[f"unconstrained_tok_s_{key}"] = best_c, best_u
        out["ratio_b16"] = out["unconstrained_tok_s_b16"] / out["tok_s_b16"]
        return out
    finally:
        sched.close()


def first_tokens(sched: Scheduler, ids: list[int], n: int) -> float:
    """Seconds until every one of the n replies has its first token."""
    t0 = time.perf_counter()
    reply = sched.submit(Request(ids, sampling=SamplingParams(temperature=1.0, seed=1), max_new_tokens=2, n=n,
                                 cache=False))
    firsts = []

    def take(r):
        for i, _ in enumerate(r.tokens()):
            if i == 0:
                firsts.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=take, args=(r,)) for r in [reply, *reply.siblings]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(firsts)


def n_replies(lm, p: dict) -> dict:
    ids = prompt_ids(lm, p["n_prompt"])
    sched = Scheduler(lm.engine, max_batch=8, prefill_budget=256)
    try:
        first_tokens(sched, ids[:64], 8)  # warm-up
        t1, t8, read = [], [], 0
        for _ in range(3):
            t1.append(first_tokens(sched, ids, 1))
            before = sched.stats()["prefill_tokens"]
            t8.append(first_tokens(sched, ids, 8))
            read = sched.stats()["prefill_tokens"] - before
        return {"ttft_n1_s": min(t1), "ttft_n8_s": min(t8), "ratio": min(t8) / min(t1),
                "prompt_tokens_read_n8": read, "prompt_tokens": len(ids)}
    finally:
        sched.close()


def echo_child(tokens: int) -> dict:
    """In a fresh process: peak RSS after loading and a small warm-up score, then after scoring."""
    lm = load()
    sched = Scheduler(lm.engine, max_batch=2, prefill_budget=256)
    try:
        list(sched.submit(Request(prompt_ids(lm, 64), prompt_logprobs=5, cache=False)))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reply = sched.submit(Request(long_prompt(lm, tokens), prompt_logprobs=5, cache=False))
        list(reply)
        assert len(reply.prompt_logprobs) == tokens
        return {"tokens": tokens, "base_bytes": base,
                "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    finally:
        sched.close()


def long_prompt(lm, tokens: int) -> list[int]:
    ids = prompt_ids(lm, 512)
    return (ids * (tokens // len(ids) + 1))[:tokens]


def echo(p: dict) -> dict:
    out = {}
    for tokens in p["echo"]:
        proc = subprocess.run([sys.executable, __file__, "--echo-child", str(tokens)], capture_output=True, text=True,
                              check=True, timeout=900)
        out[tokens] = json.loads(proc.stdout)
    small, large = (out[t] for t in p["echo"])
    return {"peak_bytes_1k": small["peak_bytes"], "peak_bytes_32k": large["peak_bytes"],
            "tokens": list(p["echo"]), "growth": large["peak_bytes"] / small["peak_bytes"] - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    ap.add_argument("--only", choices=("constrained", "n", "echo"), help="run one section")
    ap.add_argument("--echo-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_child:
        print(json.dumps(echo_child(args.echo_child)))
        return
    p = QUICK if args.quick else FULL
    lm = load()
    sections = {"constrained": lambda: constrained(lm, p), "n": lambda: n_replies(lm, p), "echo": lambda: echo(p)}
    out = {name: run() for name, run in sections.items() if args.only in (None, name)}
    if not args.json:
        print(__doc__)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
