"""Where the app runs: ZeroGPU, a dedicated GPU or CPU, and how GPU work is shipped on ZeroGPU.

On a ZeroGPU Space the main process has no GPU. A function decorated with `spaces.GPU` runs in a
forked worker that gets a GPU slice for the call: its arguments and every value it returns or
yields are pickled across the process boundary, and nothing it mutates comes back. So:

- `prepare()` must run before torch touches CUDA (first lines of app.py): it imports `spaces`,
  which patches torch so the main process can "move" models to cuda; the worker then really does.
- Per-session recurrent states stay on the CPU in the main process between calls. A GPU stream
  (`make_gpu_stream`) takes the session's state, moves it to the GPU in the worker, streams
  tokens, and yields a final `StateUpdate` with the advanced state back on the CPU.
- If the visitor stops mid-reply, no StateUpdate arrives (the worker is closed): the session
  keeps its previous state and must re-read the tokens it has beyond `state.seqlen` on the next
  turn. On a dedicated GPU the state is advanced in place instead; both satisfy the same rule
  (`state.seqlen` says how many tokens the state holds).
- Gradio on ZeroGPU defaults the queue to max_size=1, rejecting a second visitor while one
  generates; `queue_options` always passes an explicit size and concurrency.

Outside ZeroGPU `gpu_task` is the identity and states may live on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from .engine import Engine, State, TokenEvent

# Conservative throughput of the 7B on a ZeroGPU slice, for the GPU time a call asks for. Asking
# less than the 60 s default keeps visitors with little quota left served and ranks them higher.
PREFILL_TOK_S = 2000.0
DECODE_TOK_S = 20.0
STARTUP_S = 15.0  # worker fork + moving the weights onto the slice
MAX_DURATION_S = 120  # longer requests are refused outright for visitors without PRO


def on_zerogpu(env: Mapping[str, str] = os.environ) -> bool:
    """True on a ZeroGPU Space (the same test the `spaces` package applies)."""
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def prepare() -> None:
    """Import `spaces` first thing on ZeroGPU, before any CUDA initialisation; no-op elsewhere."""
    if on_zerogpu():
        import spaces  # noqa: F401  (patches torch for the CPU-only main process)


def gpu_task(fn: Callable | None = None, *, duration: int | Callable[..., int] = 60) -> Callable:
    """`spaces.GPU(fn, duration=...)` on ZeroGPU, `fn` itself elsewhere.

    `duration` is seconds of GPU time to request, or a function of the call's arguments.
    Usable as `gpu_task(fn)`, `@gpu_task` or `@gpu_task(duration=...)`.
    """
    if fn is None:
        return lambda f: gpu_task(f, duration=duration)
    if not on_zerogpu():
        return fn
    import spaces

    return spaces.GPU(fn, duration=duration)


def estimate_duration(prompt_tokens: int, max_new_tokens: int) -> int:
    """Seconds of GPU time to request for one reply, capped at MAX_DURATION_S."""
    seconds = STARTUP_S + prompt_tokens / PREFILL_TOK_S + max_new_tokens / DECODE_TOK_S
    return int(min(MAX_DURATION_S, max(10.0, seconds)))


@dataclass
class StateUpdate:
    """The last item of a GPU stream: the advanced state, on the device the caller keeps it on."""

    state: State


def make_gpu_stream(resolve: Callable[[str], tuple[Engine, Any]]) -> Callable[..., Iterator]:
    """A generator function to run a reply on the GPU: token events, then one StateUpdate.

    resolve(model_key) -> (engine, tokenizer) runs where the GPU is (in the ZeroGPU worker, whose
    forked memory holds the loaded models), so neither the model nor the tokenizer is pickled.
    Call it as gpu_stream(model_key, state, input_ids [1, T], **Engine.stream kwargs).
    """

    def gpu_stream(model_key: str, state: State, input_ids: torch.Tensor,
                   **stream_kwargs) -> Iterator[TokenEvent | StateUpdate]:
        engine, tokenizer = resolve(model_key)
        home = state.device
        work = state if home == engine.device else state.to(engine.device)  # in place on a real GPU
        for event in engine.stream(input_ids, work, tokenizer=tokenizer, **stream_kwargs):
            yield event
        yield StateUpdate(work if work is state else work.to(home))

    def duration(model_key: str, state: State, input_ids: torch.Tensor, **stream_kwargs) -> int:
        return estimate_duration(int(input_ids.shape[-1]), int(stream_kwargs.get("max_new_tokens", 256)))

    return gpu_task(gpu_stream, duration=duration)


def queue_options(max_size: int | None, concurrency: int | None) -> dict[str, Any]:
    """Keyword arguments for `demo.queue(...)`; explicit, so ZeroGPU's max_size=1 never applies.

    On ZeroGPU each running call holds its own GPU slice, so `concurrency` replies can run at
    once; on one dedicated GPU the model manager serialises them anyway.
    """
    if max_size is not None and max_size < 1:
        raise ValueError(f"queue max_size must be >= 1 or None (unbounded), got {max_size}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"queue concurrency must be >= 1 or None (unbounded), got {concurrency}")
    return {"max_size": max_size, "default_concurrency_limit": concurrency}


def hardware_info(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What the System tab shows about the machine: the Space, its hardware flavor, the device."""
    from .hardware import HARDWARE

    flavor = env.get("SPACE_HARDWARE", "")
    declared = f"{flavor} ({HARDWARE[flavor].label})" if flavor in HARDWARE else (flavor or "not a Space")
    if on_zerogpu(env):
        device = "ZeroGPU: a GPU slice is attached to each generation call"
    elif torch.cuda.is_available():
        device = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU: {os.cpu_count()} cores, no GPU"
    return {"space": env.get("SPACE_ID", "local run"), "hardware": declared, "device": device}
