"""This engine against llama.cpp on a CPU, the same model side by side in one run. Prints JSON.

    pip install -r requirements-bench.txt          # llama-cpp-python (built from source) and gguf
    python bench/cpu_peer.py --json                # 130M and 7B-width shapes, 1 and 2 threads
    python bench/cpu_peer.py --json --threads 1    # one thread count: one object instead of a list
    python bench/cpu_peer.py --quick --json        # a tiny shape, 1 thread, in seconds

Without llama-cpp-python or gguf it prints {"skipped": "<why>"} and exits 0.

On a CPU, people who want Falcon Mamba run llama.cpp: TII publishes GGUF files of the model for it.
This bench builds a random-weight Falcon Mamba of each shape in fp32, writes it as a GGUF file with
the `gguf` package's writer (the tensor names, layouts and metadata llama.cpp's converter gives a
FalconMambaForCausalLM: A_log stored as A = -exp(A_log), the conv weight squeezed to [D, K],
dt/B/C RMS norms switched on; and a byte-level BPE vocabulary of the model's size, since random
weights come with no tokenizer), loads it with llama-cpp-python, and runs both engines on the same
token ids with the same thread count (torch.set_num_threads for this engine; n_threads and
n_threads_batch for llama.cpp), the two measured in turns so both see the same machine load.

Shapes:
  130M      hidden 768, 24 layers, vocab 50304, tied embeddings (bench/engine.py's 130M config)
  7b-width  the published falcon-mamba-7b config (hidden 4096, inner 8192, dt rank 256, vocab
            65024) at 2 of its 64 layers: the 7B's per-layer matrices and its embedding and head
  tiny      (--quick only) hidden 64, 2 layers, vocab 512

Per shape and thread count, for "ours" and "llama_cpp":
  decode_tok_s   batch-1 greedy tokens/s after a 16-token prompt: each step feeds one token and
                 takes the argmax of the next logits (ours: Engine.stream, the app's path; llama.cpp:
                 Llama.eval of one token and the argmax of its logits); the steps after the first
                 token, median of --repeats runs after a warm-up run
  prefill_tok_s  tokens/s reading a --prompt-tokens prompt into an empty state up to the last
                 position's logits (ours: Engine.prefill in its default 256-token chunks; llama.cpp:
                 one batch), median of --repeats runs after a warm-up run
and same_greedy_tokens: the first 32 greedy tokens of the two engines are the same ids (fp32 weights
on both sides; only the order of float additions differs). "ratio" is ours / llama.cpp per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "130M": dict(hidden_size=768, num_hidden_layers=24, vocab_size=50304),
    "7b-width": dict(layers=2),  # the published 7B config at this many layers
}
QUICK_SHAPES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=512)}
CHECK_TOKENS = 32  # greedy tokens compared between the engines
DECODE_PROMPT = 16  # prompt tokens before the decode runs
N_CTX = 4096  # llama.cpp context (a recurrent model keeps one state per sequence whatever this is)


def missing_package() -> str | None:
    """Why the peer cannot run here, or None."""
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        try:
            __import__(module)
        except ImportError as e:  # a broken build raises OSError-derived errors too, left to surface
            return f"{package} is not installed ({e}); pip install -r requirements-bench.txt"
    return None


# -- the model -----------------------------------------------------------------------------------
def build_model(name: str, quick: bool):
    """A random-weight fp32 FalconMambaForCausalLM of the named shape."""
    import torch

    from fm_demo.engine import tiny_config
    from kernels_check.models import build_random_model, config_7b

    shape = (QUICK_SHAPES if quick else SHAPES)[name]
    if "layers" in shape:
        config = config_7b()
        config.num_hidden_layers = shape["layers"]
    else:
        config = tiny_config(**shape)
    # llama.cpp normalises dt, B and C with the layers' RMS-norm epsilon (the GGUF file has no key of
    # their own for it); transformers with config.mixer_rms_eps (1e-6 against 1e-5). The same value
    # on both sides, so that the two engines compute the same function.
    config.mixer_rms_eps = config.layer_norm_epsilon
    return build_random_model(config, "cpu", torch.float32, seed=0)


def byte_level_vocab(size: int) -> tuple[list[str], list[str]]:
    """A GPT-2 style byte-level BPE vocabulary of `size` tokens: the 256 byte symbols, then
    two-symbol tokens, each with the merge that makes it (so every merge's parts are tokens).
    The last id is <|endoftext|>, a control token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]  # 256 symbols
    if size < len(symbols) + 1 or size > len(symbols) + len(symbols) ** 2 + 1:
        raise ValueError(f"a byte-level vocabulary here has 257 to {len(symbols) ** 2 + 257} tokens, not {size}")
    tokens, merges = list(symbols), []
    for i in range(size - len(symbols) - 1):
        a, b = symbols[i // len(symbols)], symbols[i % len(symbols)]
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    tokens.append("<|endoftext|>")
    return tokens, merges


def write_gguf(model, path: Path) -> int:
    """Write `model` (fp32 FalconMambaForCausalLM) as a llama.cpp 'mamba' GGUF file; returns its bytes."""
    import gguf
    import torch

    cfg = model.config
    sd = model.state_dict()
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MAMBA])
    w.add_name(f"falcon-mamba random {cfg.hidden_size}x{cfg.num_hidden_layers}")
    w.add_context_length(2 ** 20)  # a recurrent model has no context limit; llama.cpp wants a value
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(0)  # no attention or MLP: llama.cpp reads these keys all the same
    w.add_head_count(0)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(cfg.intermediate_size)
    w.add_ssm_state_size(cfg.state_size)
    w.add_ssm_time_step_rank(cfg.time_step_rank)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_ssm_dt_b_c_rms(True)  # Falcon Mamba's weightless RMS norms of dt, B and C
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, merges = byte_level_vocab(cfg.vocab_size)
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().contiguous().numpy())

    T = gguf.TENSOR_NAMES
    put(T[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", sd["backbone.embeddings.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."

        def name(kind, suffix: str = ".weight") -> str:
            return T[kind].format(bid=i) + suffix

        put(name(gguf.MODEL_TENSOR.ATTN_NORM), sd[p + "norm.weight"])
        put(name(gguf.MODEL_TENSOR.SSM_IN), sd[p + "mixer.in_proj.weight"])
        put(name(gguf.MODEL_TENSOR.SSM_CONV1D), sd[p + "mixer.conv1d.weight"][:, 0, :])  # [D, 1, K] -> [D, K]
        put(name(gguf.MODEL_TENSOR.SSM_CONV1D, ".bias"), sd[p + "mixer.conv1d.bias"])
        put(name(gguf.MODEL_TENSOR.SSM_X), sd[p + "mixer.x_proj.weight"])
        put(name(gguf.MODEL_TENSOR.SSM_DT), sd[p + "mixer.dt_proj.weight"])
        put(name(gguf.MODEL_TENSOR.SSM_DT, ".bias"), sd[p + "mixer.dt_proj.bias"])
        put(name(gguf.MODEL_TENSOR.SSM_A, ""), -torch.exp(sd[p + "mixer.A_log"].float()))
        put(name(gguf.MODEL_TENSOR.SSM_D, ""), sd[p + "mixer.D"])
        put(name(gguf.MODEL_TENSOR.SSM_OUT), sd[p + "mixer.out_proj.weight"])
    put(T[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight", sd["backbone.norm_f.weight"])
    if not cfg.tie_word_embeddings:  # tied: llama.cpp uses token_embd for the head, as the converter leaves it
        put(T[gguf.MODEL_TENSOR.OUTPUT] + ".weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.stat().st_size


# -- the two engines -----------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, model):
        from fm_demo.engine import Engine

        self.engine = Engine(model)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens after `prompt`, and the seconds from the first token to the last."""
        import torch

        from fm_demo.engine import SamplingParams

        events = list(self.engine.stream(torch.tensor([prompt]), self.engine.new_state(), SamplingParams(), n))
        return [e.token_id for e in events], events[-1].metrics.decode_s

    def prefill(self, prompt: list[int]) -> float:
        import torch

        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        self.engine.prefill(ids, self.engine.new_state())
        return time.perf_counter() - t0


class LlamaCpp:
    name = "llama_cpp"

    def __init__(self, path: Path, threads: int, n_batch: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=N_CTX, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                         n_threads_batch=threads, n_gpu_layers=0, logits_all=False, verbose=False)

    def close(self) -> None:
        """Free the model and context now (left to the garbage collector, llama-cpp-python's finaliser
        can run after its library handle is gone at interpreter exit and print a TypeError)."""
        self.llm.close()

    def _fresh(self) -> None:
        """An empty state (Llama.reset clears a recurrent model's memory as well as its token count)."""
        self.llm.reset()

    def _logits(self):
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        import numpy as np

        self._fresh()
        self.llm.eval(prompt)
        out, t_first = [], 0.0
        for i in range(n):
            tok = int(np.argmax(self._logits()))
            self.llm.eval([tok])
            out.append(tok)
            if i == 0:
                t_first = time.perf_counter()
        return out, time.perf_counter() - t_first

    def prefill(self, prompt: list[int]) -> float:
        self._fresh()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        self._logits()
        return time.perf_counter() - t0


# -- one shape at one thread count ---------------------------------------------------------------
def median_rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    return tokens / statistics.median(fn() for _ in range(repeats))


def compare(model, gguf_path: Path, threads: int, new_tokens: int, prompt_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    short = torch.randint(0, vocab - 1, (DECODE_PROMPT,), generator=g).tolist()
    long = torch.randint(0, vocab - 1, (prompt_tokens,), generator=g).tolist()
    engines = [Ours(model), LlamaCpp(gguf_path, threads, prompt_tokens)]
    tokens = {e.name: e.greedy(short, max(CHECK_TOKENS, new_tokens))[0] for e in engines}  # also a warm-up
    out = {}
    for e in engines:  # turns: warm-up then repeats of each, one engine after the other per repeat
        e.greedy(short, new_tokens), e.prefill(long)
    decode = {e.name: [] for e in engines}
    prefill = {e.name: [] for e in engines}
    for _ in range(repeats):
        for e in engines:
            decode[e.name].append(e.greedy(short, new_tokens)[1])
            prefill[e.name].append(e.prefill(long))
    for e in engines:
        out[e.name] = {"decode_tok_s": (new_tokens - 1) / statistics.median(decode[e.name]),
                       "prefill_tok_s": prompt_tokens / statistics.median(prefill[e.name])}
    out["same_greedy_tokens"] = tokens["ours"][:CHECK_TOKENS] == tokens["llama_cpp"][:CHECK_TOKENS]
    if not out["same_greedy_tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["llama_cpp"])) if a != b)
        out["first_different_token"] = first
    out["ratio"] = {k: out["ours"][k] / out["llama_cpp"][k] for k in ("decode_tok_s", "prefill_tok_s")}
    engines[1].close()
    del engines
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON (the default output; a summary goes to stderr)")
    ap.add_argument("--quick", action="store_true", help="a tiny shape at 1 thread: a smoke run with the same keys")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts, both engines (default 1 2; --quick: 1)")
    ap.add_argument("--models", nargs="+", default=None, help=f"shapes to run (default: {' '.join(SHAPES)})")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per decode run (default 64; quick 33)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prefill prompt length (default 512; quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure, median taken (default 5; quick 2)")
    ap.add_argument("--workdir", default=None, help="where the GGUF files are written (default: a temporary folder)")
    args = ap.parse_args(argv)

    why = missing_package()
    if why:
        print(json.dumps({"skipped": why}))
        return
    import llama_cpp
    import torch

    threads = args.threads or ([1] if args.quick else [1, 2])
    names = args.models or list(QUICK_SHAPES if args.quick else SHAPES)
    new_tokens = args.new_tokens or (CHECK_TOKENS + 1 if args.quick else 64)
    prompt_tokens = args.prompt_tokens or (64 if args.quick else 512)
    repeats = args.repeats or (2 if args.quick else 5)
    runs = {t: {"threads": t, "models": {}} for t in threads}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in names:
            model = build_model(name, args.quick)
            path = Path(tmp) / f"{name}.gguf"
            nbytes = write_gguf(model, path)
            params = sum(p.numel() for p in model.parameters())
            for t in threads:
                r = compare(model, path, t, new_tokens, prompt_tokens, repeats)
                r["params"] = params
                runs[t]["models"][name] = r
                print(f"{name} ({params / 1e6:.0f}M params, GGUF {nbytes / 2**20:.0f} MiB), {t} thread(s): "
                      f"decode {r['ours']['decode_tok_s']:.1f} vs {r['llama_cpp']['decode_tok_s']:.1f} tok/s "
                      f"({r['ratio']['decode_tok_s']:.2f}x), prefill {r['ours']['prefill_tok_s']:.0f} vs "
                      f"{r['llama_cpp']['prefill_tok_s']:.0f} tok/s ({r['ratio']['prefill_tok_s']:.2f}x), "
                      f"same greedy tokens: {r['same_greedy_tokens']}", file=sys.stderr)
            del model
            path.unlink()
    meta = {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__, "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens, "repeats": repeats}
    out = [{**runs[t], "meta": meta} for t in threads]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=1))


if __name__ == "__main__":
    main()
