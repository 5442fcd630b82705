"""ModelManager: load (preset, precision) through transformers, keep what fits, explain failures.

Several models stay loaded while their estimated weight bytes fit the budget (the compare tab
needs two); beyond it the least recently used one is unloaded first. Loads of one key are
serialized by a per-key lock (two sessions asking for the same model wait for one load) and all
loads share one lock, so two 7B checkpoints never stream into memory at the same time.
Every failure comes back as a ModelLoadError whose text a user can act on; nothing is left
half-registered and the server keeps serving the models it has.

What clients may load: the served presets (Settings.served_models; empty: every offered preset
whose smallest precision fits the budget, estimated from its config.json or a known shape, with
nothing downloaded). Anything else is refused ("not_served") before it loads. A load estimates its
weights from the config alone (a hub checkpoint's config.json is fetched first, by itself) and
checks the budget before a single weight is downloaded. Room is made only by unloading models
nobody is using: one with rows running or waiting in its scheduler stays, and the load that needed
the room is refused ("busy"). Every loaded model's prefix cache joins one CachePool: one byte budget
(session_budget_bytes) for all of them.

On ZeroGPU the manager also makes the GPU calls replies go through (GpuCalls), once, before the
app launches, and `preload()` loads the served models then: `spaces` moves to the GPU worker
only weights that were on "cuda" when the app started. So there every served model must fit
together (a load never unloads another), each loads once, at start-up, and after `preload()` a
request for anything else is refused with a message instead of loading a model the GPU worker
would never see.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from . import zerogpu
from .chat import ChatFormat, format_for, stop_token_ids
from .engine import Engine, State
from .metrics import free_device_memory
from .serving.prefix_cache import CachePool, PrefixCache
from .settings import PRECISION_LABELS, Preset, Settings

if TYPE_CHECKING:
    from .serving import Runner

ProgressFn = Callable[[float, str], None]
Key = tuple[str, str]  # (preset key, precision)
LINEAR_BYTES_4BIT = 0.5 + 4 / 64  # NF4 nibble + one fp32 absmax per 64-value block
# Where a load's progress bar stands at each step; the download (files fetched of the snapshot's
# files) fills its range, and most of a load's time is the download or reading the weights.
PROGRESS_PREPARING, PROGRESS_DOWNLOAD, PROGRESS_WEIGHTS, PROGRESS_TOKENIZER, PROGRESS_READY = (
    0.0, (0.05, 0.7), 0.75, 0.9, 1.0)


class ModelLoadError(Exception):
    """A model that could not be loaded; str(e) is written for the user.

    reason: unknown_model | not_served | bad_precision | missing_dependency | network | not_found |
            out_of_memory | busy | not_preloaded | incompatible | error
    """

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadedModel:
    key: Key
    preset: Preset
    precision: str
    model: Any  # transformers FalconMambaForCausalLM
    tokenizer: Any
    engine: Engine
    nbytes: int  # weights and buffers in memory
    load_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. whether its chat template is prefix-stable
    gpu: GpuCalls | None = None  # on ZeroGPU: replies run through these, not engine.stream
    runner: Runner | None = None  # how replies run (serving/runner.py); made by the manager
    prefix_cache: PrefixCache | None = None  # states by token prefix, shared by its requests; made by the manager
    # its chat template renders N+1 turns as N turns plus the reply (templates.check, at load);
    # None: prompts come from a hand-written format (chat.py)
    prefix_stable: bool | None = None

    @property
    def kind(self) -> str:
        return self.preset.kind

    @property
    def chat_format(self) -> ChatFormat:
        """How prompts are written: the tokenizer's chat template (stop tokens: the generation
        config's eos ids) or a hand-written format."""
        return format_for(self.kind, self.tokenizer, self.model.generation_config.eos_token_id)

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def label(self) -> str:
        return f"{self.preset.label} · {PRECISION_LABELS.get(self.precision, self.precision)}"


@dataclass(frozen=True)
class GpuCalls:
    """Where a model's GPU work runs on ZeroGPU: functions `spaces` runs in its GPU worker.

    stream(key, state, ids [1, T], **Engine.stream kwargs): token events, then a StateUpdate.
    prefill(key, state, ids [1, T]) -> the state advanced by ids, on the state's device (CPU).
    Arguments and results cross a process boundary, so the state is never advanced in place.
    """

    stream: Callable[..., Iterator]
    prefill: Callable[..., State]

    @classmethod
    def make(cls, resolve: Callable[[Any], tuple[Engine, Any]]) -> GpuCalls:
        """resolve(model key) -> (engine, tokenizer), run in the worker (whose memory is a fork)."""

        def prefill(model_key, state: State, input_ids) -> State:
            engine, _ = resolve(model_key)
            work = state.to(engine.device)
            engine.prefill(input_ids, work)
            return work.to(state.device)

        def duration(model_key, state: State, input_ids) -> int:
            return zerogpu.estimate_duration(int(input_ids.shape[-1]), 0)

        return cls(zerogpu.make_gpu_stream(resolve), zerogpu.gpu_task(prefill, duration=duration))


def make_runner(engine: Engine, gpu: GpuCalls | None, key: Key, settings: Settings,
                cache: PrefixCache) -> Runner:
    """The ZeroGPU runner on ZeroGPU, else a batched scheduler sized by `settings`; both keep
    states in `cache`."""
    from .serving import BatchedRunner, ZeroGpuRunner

    if gpu is not None:
        return ZeroGpuRunner(gpu, key, cache, lambda: engine.new_state(device="cpu"))
    return BatchedRunner(engine, settings.batch_size_limit(), settings.prefill_budget_tokens(),
                         settings.batch_waiting_limit(), name=f"{key[0]}-{key[1]}", cache=cache,
                         checkpoint_tokens=settings.checkpoint_interval())


def estimate_model_bytes(config, precision: str, device: str = "cuda") -> int:
    """Weight bytes of a Falcon Mamba config in `precision` on `device` (no load needed).

    bitsandbytes quantizes the mixers' Linear layers; everything else (embeddings, lm_head, conv,
    norms) stays in the compute dtype the load asks for: bf16 on CUDA, fp32 on the CPU, where the
    embeddings and lm_head then take twice the bytes.
    """
    H, D, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    N, K, R = config.state_size, config.conv_kernel, config.time_step_rank
    linear = H * 2 * D + D * (R + 2 * N) + R * D + D * H  # in_proj, x_proj, dt_proj, out_proj
    small = D * K + 3 * D + D * N + H  # conv weight/bias, dt bias, D, A_log, norm
    embed = V * H * (1 if config.tie_word_embeddings else 2)
    if precision == "4bit":
        rest = 2 if device.startswith("cuda") else 4
        return int(L * (linear * LINEAR_BYTES_4BIT + small * rest) + (embed + H) * rest)
    per = 4 if precision == "fp32" else 2
    return (L * (linear + small) + embed + H) * per


# Shapes of the hub presets, so the served list needs no download: every 7B preset is Falcon Mamba
# 7B's architecture (Falcon3-Mamba continues its training in the same shape), the published
# config.json (kernels_check/falcon-mamba-7b.config.json).
FALCON_MAMBA_7B_SHAPE = dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=64, vocab_size=65024,
                             state_size=16, conv_kernel=4, time_step_rank=256, tie_word_embeddings=False)
KNOWN_SHAPES = {source: FALCON_MAMBA_7B_SHAPE for source in (
    "tiiuae/falcon-mamba-7b", "tiiuae/falcon-mamba-7b-instruct", "tiiuae/falcon-mamba-7b-4bit",
    "tiiuae/falcon-mamba-7b-instruct-4bit", "tiiuae/Falcon3-Mamba-7B-Base", "tiiuae/Falcon3-Mamba-7B-Instruct")}


def known_config(preset: Preset):
    """A preset's config without downloading anything: a local checkpoint's config.json, a hub
    preset's known shape; None when neither is at hand (a hub id the server was given)."""
    from types import SimpleNamespace

    if preset.local:
        return _read_config(Path(preset.source))
    shape = KNOWN_SHAPES.get(preset.source)
    return SimpleNamespace(**shape) if shape is not None else None


def smallest_bytes(preset: Preset, config, device: str) -> int:
    """The weight bytes of the preset's smallest precision this process can load on `device`."""
    usable = [p for p in preset.precisions if p != "4bit" or _bitsandbytes_available()] or list(preset.precisions)
    return min(estimate_model_bytes(config, p, device) for p in usable)


def served_keys(settings: Settings, presets: Mapping[str, Preset], budget: int) -> tuple[str, ...]:
    """The presets clients may load: settings.served_models (those among `presets`), else every
    preset whose smallest precision fits `budget`; a hub preset of unknown shape counts (the server
    named it; its load fetches config.json alone and checks the budget before any weight)."""
    if settings.served_models:
        return tuple(k for k in settings.served_models if k in presets)
    out = []
    for key, preset in presets.items():
        try:
            config = known_config(preset)
            fits = config is None or smallest_bytes(preset, config, settings.device) <= budget
        except Exception:  # an unreadable or foreign checkpoint: its load says why
            fits = True
        if fits:
            out.append(key)
    return tuple(out)


def device_capacity(device: str) -> int:
    """Bytes a model may occupy on `device` by default: 90% of the GPU, 60% of system RAM."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    import psutil

    return int(psutil.virtual_memory().total * 0.6)


class ModelManager:
    def __init__(self, settings: Settings, presets: Mapping[str, Preset] | None = None):
        self.settings = settings
        self._presets = dict(presets) if presets is not None else settings.presets()
        self.budget_bytes = settings.model_memory_budget_bytes or device_capacity(settings.device)
        self._lock = threading.Lock()  # guards the tables below, never held while loading
        self._load_lock = threading.Lock()
        self._models: OrderedDict[Key, LoadedModel] = OrderedDict()  # least recently used first
        self._key_locks: dict[Key, threading.Lock] = {}
        self._unload_listeners: list[Callable[[LoadedModel], None]] = []
        self._sealed = False  # on ZeroGPU, once preload() is done: nothing loads any more
        self.served = served_keys(settings, self._presets, self.budget_bytes)
        # every loaded model's prefix cache joins this pool: one byte budget for all of them
        self.cache_pool = CachePool(settings.session_budget_bytes)
        # made here, before launch, because `spaces` registers its GPU functions at start-up
        self.gpu = GpuCalls.make(self._engine_and_tokenizer) if zerogpu.on_zerogpu() else None

    @property
    def presets(self) -> dict[str, Preset]:
        """The offered presets (Settings.presets()): what settings may name."""
        return dict(self._presets)

    @property
    def served_presets(self) -> dict[str, Preset]:
        """The presets clients may load: the UI's model choices and /v1/models."""
        return {k: self._presets[k] for k in self.served}

    def resolve(self, preset_key: str, precision: str | None = None) -> tuple[Preset, str]:
        preset = self._presets.get(preset_key)
        if preset is None:
            raise ModelLoadError(f"Unknown model '{preset_key}'. Available: {', '.join(self.served)}.",
                                 "unknown_model")
        if preset_key not in self.served:
            raise ModelLoadError(f"{preset.label} is not served on this server; it serves "
                                 f"{', '.join(self.served) or 'no model'}.", "not_served")
        precision = precision or self.settings.precision_for(preset)
        if precision not in preset.precisions:
            raise ModelLoadError(f"{preset.label} comes in {', '.join(preset.precisions)}, not {precision}.",
                                 "bad_precision")
        self._check_packages(precision)
        return preset, precision

    def _check_packages(self, precision: str) -> None:
        """Refuse a precision whose library this process lacks (it loads the weights itself)."""
        if precision == "4bit" and not _bitsandbytes_available():
            raise ModelLoadError("4-bit models need the bitsandbytes package (pip install bitsandbytes).",
                                 "missing_dependency")

    def get(self, preset_key: str, precision: str | None = None,
            progress: ProgressFn | None = None) -> LoadedModel:
        """The loaded model for (preset, precision), loading it first if needed."""
        preset, precision = self.resolve(preset_key, precision)
        key = (preset.key, precision)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
                if self._sealed:
                    raise ModelLoadError(self._sealed_message(preset, precision), "not_preloaded")
            with self._load_lock:
                lm = self._load(preset, precision, progress or _no_progress)
            with self._lock:
                self._models[key] = lm
            return lm

    def preload(self, keys: list[str] | None = None,
                progress: ProgressFn | None = None) -> list[LoadedModel]:
        """Load `keys` (default: every served preset) in their default precision, in order.

        On ZeroGPU this is the one time models load (see the module docstring): afterwards the
        manager serves what it holds and refuses to load anything else.
        """
        loaded = [self.get(key, None, progress) for key in (keys if keys is not None else self.served)]
        if self.gpu is not None:
            with self._lock:
                self._sealed = True
        return loaded

    def _sealed_message(self, preset: Preset, precision: str) -> str:
        held = ", ".join(f"{lm.preset.label} ({lm.precision})" for lm in self._models.values()) or "none"
        return (f"{preset.label} ({precision}) is not served here: on ZeroGPU the models load once, when "
                f"the Space starts, and this Space loaded {held}.")

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def is_loaded(self, lm: LoadedModel) -> bool:
        with self._lock:
            return self._models.get(lm.key) is lm

    def unload(self, key: Key) -> bool:
        """Unload a model now, whoever uses it (an operator's call: running replies end with
        SchedulerClosed). Making room for a load never does this; see _unload_idle."""
        with self._lock:
            lm = self._models.pop(tuple(key), None)
        if lm is None:
            return False
        lm.runner.close()  # replies still running end with a clear message
        self._forget(lm)
        return True

    def _unload_idle(self) -> bool:
        """Unload the least recently used model with no request running or waiting; False when
        every loaded model is in use. The check and the close are one step under the scheduler's
        lock (close_if_idle), and the manager's lock keeps get() from handing the model out
        meanwhile."""
        with self._lock:
            victim = next((lm for lm in self._models.values() if lm.runner.close_if_idle()), None)
            if victim is not None:
                del self._models[victim.key]
        if victim is None:
            return False
        self._forget(victim)
        return True

    def _forget(self, lm: LoadedModel) -> None:
        for fn in list(self._unload_listeners):
            fn(lm)
        self.cache_pool.detach(lm.prefix_cache)  # its states leave the shared budget
        free_device_memory(lm.device)

    def on_unload(self, fn: Callable[[LoadedModel], None]) -> None:
        """Call fn(loaded_model) after a model leaves the manager (so holders can drop it)."""
        self._unload_listeners.append(fn)

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(lm.nbytes for lm in self._models.values())

    def _engine_and_tokenizer(self, key) -> tuple[Engine, Any]:
        """A loaded model by key, for the GPU worker.

        No lock: the worker is a fork, where a lock another thread held at fork time stays held.
        """
        lm = self._models.get(tuple(key))
        if lm is None:
            raise ModelLoadError(f"{key[0]} ({key[1]}) is not loaded in the GPU worker (on ZeroGPU every "
                                 f"offered model must be loaded at start-up)")
        return lm.engine, lm.tokenizer

    # -- loading -----------------------------------------------------------------------------
    def _load(self, preset: Preset, precision: str, progress: ProgressFn) -> LoadedModel:
        t0 = time.perf_counter()
        try:
            progress(PROGRESS_PREPARING, f"Preparing {preset.label}")
            config = _fetch_config(preset)  # config.json alone: the budget is checked before any weight
            if getattr(config, "model_type", None) not in ("falcon_mamba", "mamba"):
                raise ModelLoadError(f"{preset.source} is a {config.model_type} model, not Falcon Mamba.",
                                     "incompatible")
            need = estimate_model_bytes(config, precision, self.settings.device)
            self._make_room(need, preset, precision)
            path = _fetch(preset, progress)
            progress(PROGRESS_WEIGHTS, f"Loading {preset.label} weights in {precision}")
            model = _from_pretrained(path, precision, self.settings.device, preset.prequantized)
            progress(PROGRESS_TOKENIZER, "Loading tokenizer")
            tokenizer = _tokenizer(path)
            engine = Engine(model, chunk_size=self.settings.chunk_size)
        except Exception as e:
            raise _explain(e, preset, precision) from e
        key = (preset.key, precision)
        cache = self.cache_pool.cache(self.settings.share_prefix_cache)
        lm = LoadedModel(key, preset, precision, model, tokenizer, engine, int(model.get_memory_footprint()),
                         time.perf_counter() - t0, (f"kernels: {engine.ops.reason}",), self.gpu,
                         make_runner(engine, self.gpu, key, self.settings, cache), cache)
        check_template(lm)
        progress(PROGRESS_READY, f"{preset.label} ready in {lm.load_s:.1f} s")
        return lm

    def _make_room(self, need: int, preset: Preset, precision: str) -> None:
        if need > self.budget_bytes:
            raise ModelLoadError(
                f"{preset.label} in {precision} needs about {need / 1e9:.1f} GB, more than the "
                f"{self.budget_bytes / 1e9:.1f} GB this server allows for models. Try 4-bit or a smaller model.",
                "out_of_memory")
        if self.gpu is not None and self.loaded_bytes() + need > self.budget_bytes:
            raise ModelLoadError(  # unloading would take a model from the GPU worker for good
                f"{preset.label} in {precision} needs about {need / 1e9:.1f} GB, and with the models "
                f"already loaded that is more than the {self.budget_bytes / 1e9:.1f} GB this server allows. "
                f"On ZeroGPU every offered model stays loaded: offer fewer models or a smaller precision.",
                "out_of_memory")
        while self.loaded_bytes() + need > self.budget_bytes:
            if not self._unload_idle():
                raise ModelLoadError(self._busy_message(need, preset, precision), "busy")

    def _busy_message(self, need: int, preset: Preset, precision: str) -> str:
        in_use = ", ".join(lm.label for lm in self.loaded() if lm.runner.in_use()) or "the loaded models"
        return (f"The server is busy: {preset.label} in {precision} needs about {need / 1e9:.1f} GB, and the "
                f"room it needs is held by models that are answering requests right now ({in_use}). "
                f"Try again in a moment, or pick a model that is already loaded.")


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _no_progress(fraction: float, message: str) -> None:
    return None


def _fetch(preset: Preset, progress: ProgressFn) -> Path:
    """Local directory of the checkpoint, downloading from the hub when needed."""
    if preset.local:
        return Path(preset.source)
    if preset.source.startswith(("/", ".")) or Path(preset.source).is_absolute():
        raise ModelLoadError(f"No checkpoint at {preset.source}. The bundled tiny checkpoints are built by "
                             f"the fm_demo.tiny training script.", "not_found")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
    return Path(snapshot_download(preset.source, allow_patterns=patterns,
                                  tqdm_class=_progress_bar(progress, preset.label)))


def _progress_bar(progress: ProgressFn, label: str):
    """A tqdm class that forwards the hub's file-count progress to `progress` (PROGRESS_DOWNLOAD)."""
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def update(self, n=1):
            self.done = getattr(self, "done", 0) + (n or 0)
            if self.total:
                lo, hi = PROGRESS_DOWNLOAD
                progress(lo + (hi - lo) * min(1.0, self.done / self.total),
                         f"Downloading {label}: {self.done}/{self.total} files")
            return super().update(n)

    return _Bar


def _fetch_config(preset: Preset):
    """The checkpoint's config, fetching only config.json from the hub (no weights)."""
    if preset.local:
        return _read_config(Path(preset.source))
    if preset.source.startswith(("/", ".")) or Path(preset.source).is_absolute():
        raise ModelLoadError(f"No checkpoint at {preset.source}. The bundled tiny checkpoints are built by "
                             f"the fm_demo.tiny training script.", "not_found")
    from huggingface_hub import hf_hub_download

    return _read_config(Path(hf_hub_download(preset.source, "config.json")).parent)


def _read_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def _from_pretrained(path: Path, precision: str, device: str, prequantized: bool):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": {"": "cuda:0" if device == "cuda" else "cpu"}}
    if precision == "fp32":
        kwargs["dtype"] = torch.float32
    elif precision == "bf16":
        kwargs["dtype"] = torch.bfloat16
    else:
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["dtype"] = compute
        if not prequantized:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def check_template(lm: LoadedModel) -> None:
    """Render a sample conversation whole and turn by turn with lm's chat template (if it has one)
    and record whether they agree on it and in its notes (the System tab shows them)."""
    from .templates import check

    fmt = lm.chat_format
    if not fmt.template:
        return
    result = check(lm.tokenizer, stop_token_ids(fmt, lm.tokenizer))
    lm.prefix_stable = result.prefix_stable
    lm.notes = (*lm.notes, result.note)


def _explain(e: Exception, preset: Preset, precision: str) -> ModelLoadError:
    """Turn whatever a load raised into a message that says what happened and what to do."""
    if isinstance(e, ModelLoadError):
        return e
    from huggingface_hub import errors as hub

    name, text = preset.label, f"{type(e).__name__}: {e}".strip()
    if isinstance(e, (hub.GatedRepoError, hub.RepositoryNotFoundError, hub.RevisionNotFoundError)):
        return ModelLoadError(f"{preset.source} was not found on the Hugging Face Hub, or it needs an access "
                              f"token this server does not have.", "not_found")
    if isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)) or "Connect" in text:
        return ModelLoadError(f"{name} is not in the local cache and the Hugging Face Hub cannot be reached "
                              f"(no network?). Try a bundled model.", "network")
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text:
        return ModelLoadError(f"Not enough memory to load {name} in {precision}. Try 4-bit, a smaller model, "
                              f"or fewer loaded models.", "out_of_memory")
    if isinstance(e, ImportError):
        return ModelLoadError(f"{name} in {precision} needs a package that is not installed ({e}).",
                              "missing_dependency")
    if isinstance(e, TypeError) and "Falcon Mamba" in str(e):
        return ModelLoadError(f"{preset.source} is not a Falcon Mamba model: {e}", "incompatible")
    if isinstance(e, (OSError, ValueError)):
        return ModelLoadError(f"Could not read {name} from {preset.source}: {text}", "not_found")
    return ModelLoadError(f"Could not load {name} in {precision}: {text}", "error")
