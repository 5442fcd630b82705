"""Which grammar library masks tokens fastest on this project's tokenizer. Prints JSON.

    python bench/constraints.py --json
    python bench/constraints.py --quick --json    # fewer repetitions (seconds; the same keys)

For each library installed (llguidance, xgrammar, outlines-core: requirements-bench.txt has the
two the app does not use), on the bundled tiny instruct tokenizer and one JSON schema (an object
with a string, an enum, an integer and an array of objects):

- tokenizer_ms: the one-time preparation of the tokenizer (per loaded model in the app);
- compile_ms: compiling the schema (per request in the app), median of a few;
- mask_us_b1: one step of one row: compute the allowed-token mask, unpack it into the [V] bool
  tensor the decode step applies, and advance by the chosen token; the mean over the tokens of a
  valid reply, which every library must accept;
- mask_us_b16: the same step for 16 rows one after another (what a batch of 16 constrained rows
  costs per step, single-threaded like the decode loop);
- deep_schema: a hostile schema (arrays nested DEEP levels) compiled in a child process with a
  time limit: {"outcome": "refused" | "compiled" | "timeout" | "crashed", "s"}. A request's
  schema is compiled while the request is handled, so a library that hangs here hangs a worker.
  --quick checks it for the app's library alone, in process (it refuses in milliseconds).

The app's choice is recorded in fm_demo/engine/constraints.py; `chosen` names it here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fm_demo.engine import constraints  # noqa: E402
from fm_demo.tiny import checkpoint_path  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["city", "town", "village"]},
        "population": {"type": "integer"},
        "districts": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "area": {"type": "number"}},
            "required": ["name", "area"], "additionalProperties": False}},
    },
    "required": ["name", "kind", "population", "districts"],
    "additionalProperties": False,
}
REPLY = {"name": "Paris", "kind": "city", "population": 2102650,
         "districts": [{"name": "Louvre", "area": 1.83}, {"name": "Bourse", "area": 0.99},
                       {"name": "Temple", "area": 1.17}, {"name": "Marais", "area": 1.6}]}


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_path("instruct"))


unpack = constraints.unpack_bits


def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins back to bytes (the GPT-2 table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def token_bytes(tok, vocab: int) -> list[bytes]:
    """Each id's bytes (b"" for special tokens and ids past the tokenizer's vocabulary)."""
    table, out = byte_decoder(), [b""] * vocab
    special = set(tok.all_special_ids)
    for piece, i in tok.get_vocab().items():
        if i < vocab and i not in special:
            out[i] = bytes(table[c] for c in piece)
    return out


class Llguidance:
    """The app's own code path (fm_demo/engine/constraints.py)."""

    name = "llguidance"

    def __init__(self, tok, vocab: int, eos: list[int]):
        import llguidance  # noqa: F401  (ImportError: not installed)

        self.tok, self.vocab, self.eos = tok, vocab, tuple(eos)
        constraints.compile_grammar("json_object", None, tok, vocab, self.eos)  # the tokenizer, prepared once

    def compile(self, schema):
        return constraints.compile_grammar("json_schema", schema, self.tok, self.vocab, self.eos)

    def matcher(self, compiled):
        return compiled.matcher()

    def step(self, m, out, tok):
        m.allowed(out)
        assert out[tok], "llguidance refused a token of a valid reply"
        m.advance(tok)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int, eos: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.words = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def step(self, m, out, tok):
        m.fill_next_token_bitmask(self.words)
        unpack(self.words[0], out)
        assert out[tok], "xgrammar refused a token of a valid reply"
        assert m.accept_token(tok)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab: int, eos: list[int]):
        import outlines_core

        self.oc = outlines_core
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok, vocab)):
            if b and i not in eos:
                pieces.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos[0], pieces)
        self.words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def step(self, m, out, tok):
        m.write_mask_into(self.words.data_ptr(), self.words.numel(), self.words.element_size())
        unpack(self.words, out)
        assert out[tok], "outlines-core refused a token of a valid reply"
        m.advance(tok)


def prepare(cls, tok, vocab: int, eos: list[int], reps: int) -> tuple[object, object, dict]:
    """The library's tokenizer and compiled schema, with what each took."""
    t = time.perf_counter()
    lib = cls(tok, vocab, eos)
    tokenizer_ms = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        compiled = lib.compile(SCHEMA)
        times.append((time.perf_counter() - t) * 1e3)
    return lib, compiled, {"tokenizer_ms": tokenizer_ms, "compile_ms": statistics.median(times)}


def mask_us(lib, compiled, ids: list[int], vocab: int, rows: int) -> float:
    """Microseconds per step of `rows` matchers walking the valid reply `ids`."""
    out = torch.zeros(vocab, dtype=torch.bool)
    ms = [lib.matcher(compiled) for _ in range(rows)]
    t = time.perf_counter()
    for tid in ids:
        for m in ms:
            lib.step(m, out, tid)
    return (time.perf_counter() - t) / len(ids) * 1e6


DEEP, DEEP_LIMIT_S = 300, 30


def deep_schema() -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(DEEP):
        schema = {"type": "array", "items": schema}
    return schema


def deep_outcome(lib) -> str:
    try:
        lib.compile(deep_schema())
        return "compiled"
    except Exception:  # noqa: BLE001  (each library has its own error types)
        return "refused"


def deep_child(name: str) -> None:
    tok = load_tokenizer()
    cls = {c.name: c for c in LIBRARIES}[name]
    print(deep_outcome(cls(tok, VOCAB, eos_ids(tok))))


def deep(name: str) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--deep-child", name], capture_output=True, text=True,
                              timeout=DEEP_LIMIT_S, check=False)
        outcome = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else "crashed"
    except subprocess.TimeoutExpired:
        outcome = "timeout"
    return {"depth": DEEP, "outcome": outcome, "s": time.perf_counter() - t}


def eos_ids(tok) -> list[int]:
    return [int(tok.convert_tokens_to_ids("<|im_end|>")), int(tok.eos_token_id)]


VOCAB = 1536
LIBRARIES = (Llguidance, Xgrammar, OutlinesCore)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="JSON only")
    ap.add_argument("--deep-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.deep_child:
        deep_child(args.deep_child)
        return
    tok = load_tokenizer()
    vocab, eos = VOCAB, eos_ids(tok)
    reps = 2 if args.quick else 7
    libraries, ready = {}, {}
    for cls in LIBRARIES:
        try:
            lib, compiled, libraries[cls.name] = prepare(cls, tok, vocab, eos, reps)
            ready[cls.name] = (lib, compiled)
        except ImportError as e:
            libraries[cls.name] = {"skipped": f"not installed: {e}"}
    ids = tok.encode(json.dumps(REPLY, separators=(",", ":")), add_special_tokens=False)
    for rows, key in ((1, "mask_us_b1"), (16, "mask_us_b16")):
        for _ in range(reps):  # interleaved rounds, best of each: the machine is shared
            for name, (lib, compiled) in ready.items():
                took = mask_us(lib, compiled, ids, vocab, rows)
                libraries[name][key] = min(libraries[name].get(key, took), took)
    for name in ready:
        libraries[name]["reply_tokens"] = len(ids)
        if not args.quick:
            libraries[name]["deep_schema"] = deep(name)
        elif name == constraints.LIBRARY:
            t = time.perf_counter()
            outcome = deep_outcome(ready[name][0])
            libraries[name]["deep_schema"] = {"depth": DEEP, "outcome": outcome, "s": time.perf_counter() - t}
    out = {"vocab": vocab, "chosen": constraints.LIBRARY, "libraries": libraries}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
