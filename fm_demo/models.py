"""ModelManager: load (preset, precision) through transformers, keep what fits, explain failures.

Several models stay loaded while their estimated weight bytes fit the budget (the compare tab
needs two); beyond it the least recently used one is unloaded first. Loads of one key are
serialized by a per-key lock (two sessions asking for the same model wait for one load) and all
loads share one lock, so two 7B checkpoints never stream into memory at the same time.
Every failure comes back as a ModelLoadError whose text a user can act on; nothing is left
half-registered and the server keeps serving the models it has.

On ZeroGPU the manager also makes the GPU calls replies go through (GpuCalls), once, before the
app launches, and `preload()` loads the offered models then: `spaces` moves to the GPU worker
only weights that were on "cuda" when the app started. So there every offered model must fit
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
from .serving.prefix_cache import PrefixCache
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

    reason: unknown_model | bad_precision | missing_dependency | network | not_found |
            out_of_memory | incompatible | error
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
        # made here, before launch, because `spaces` registers its GPU functions at start-up
        self.gpu = GpuCalls.make(self._engine_and_tokenizer) if zerogpu.on_zerogpu() else None

    @property
    def presets(self) -> dict[str, Preset]:
        return dict(self._presets)

    def resolve(self, preset_key: str, precision: str | None = None) -> tuple[Preset, str]:
        preset = self._presets.get(preset_key)
        if preset is None:
            raise ModelLoadError(f"Unknown model '{preset_key}'. Available: {', '.join(self._presets)}.",
                                 "unknown_model")
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
        """Load `keys` (default: every offered preset) in their default precision, in order.

        On ZeroGPU this is the one time models load (see the module docstring): afterwards the
        manager serves what it holds and refuses to load anything else.
        """
        loaded = [self.get(key, None, progress) for key in (keys if keys is not None else self._presets)]
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
        with self._lock:
            lm = self._models.pop(tuple(key), None)
        if lm is None:
            return False
        lm.runner.close()  # replies still running end with a clear message
        for fn in list(self._unload_listeners):
            fn(lm)
        free_device_memory(lm.device)
        return True

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
            path = _fetch(preset, progress)
            config = _read_config(path)
            if getattr(config, "model_type", None) not in ("falcon_mamba", "mamba"):
                raise ModelLoadError(f"{preset.source} is a {config.model_type} model, not Falcon Mamba.",
                                     "incompatible")
            need = estimate_model_bytes(config, precision, self.settings.device)
            self._make_room(need, preset, precision)
            progress(PROGRESS_WEIGHTS, f"Loading {preset.label} weights in {precision}")
            model = _from_pretrained(path, precision, self.settings.device, preset.prequantized)
            progress(PROGRESS_TOKENIZER, "Loading tokenizer")
            tokenizer = _tokenizer(path)
            engine = Engine(model, chunk_size=self.settings.chunk_size)
        except Exception as e:
            raise _explain(e, preset, precision) from e
        key = (preset.key, precision)
        cache = PrefixCache(self.settings.session_budget_bytes, self.settings.share_prefix_cache)
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
            with self._lock:
                victim = next(iter(self._models), None)
            if victim is None:
                return
            self.unload(victim)


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
