"""Server settings and the model presets: one source of defaults.

Every Settings field can be set by an FM_DEMO_<FIELD> environment variable (`Settings.from_env`)
or a --field-name flag (`Settings.add_cli_args` / `Settings.from_cli`, parsed only under
`__main__` in app.py). Model ids reach the server only from here: the presets below and
FM_DEMO_EXTRA_MODELS (hub ids or local checkpoint directories, checked at start-up); the browser
only ever picks among preset keys.

Defaults: the bundled tiny checkpoints on CPU, Falcon Mamba 7B where CUDA exists.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

from .checkpoints import CheckpointError, check_checkpoint, is_local_source, local_path, prequantized

PRECISIONS = ("bf16", "fp32", "4bit")
PRECISION_LABELS = {"bf16": "bf16 (GPU)", "fp32": "fp32 (CPU)", "4bit": "4-bit NF4 (bitsandbytes)"}
KINDS = ("base", "instruct")
ENV_PREFIX = "FM_DEMO_"
GiB, MiB = 1 << 30, 1 << 20
COMPARE_BF16_MIN_GPU_BYTES = 40 * GiB  # two 7B models in bf16 (2 x 14.5 GB) plus headroom


class SettingsError(ValueError):
    """A setting with a bad value; the message names the variable or flag to fix."""


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    source: str  # hub repo id or local checkpoint directory
    kind: str  # "base" | "instruct"
    precisions: tuple[str, ...]
    default_precision: str  # on CUDA; on CPU fp32 is used where the preset allows it
    prequantized: bool = False  # the checkpoint itself is 4-bit (bitsandbytes config inside)

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()


def tiny_checkpoint(kind: str) -> str:
    """Path of a bundled tiny checkpoint ("base" | "instruct")."""
    from fm_demo.tiny import checkpoint_path

    return str(checkpoint_path(kind))


def _presets() -> dict[str, Preset]:
    tiny_prec, big_prec = ("fp32", "bf16", "4bit"), ("bf16", "4bit", "fp32")
    rows = [
        Preset("tiny-base", "Falcon Mamba tiny (base, bundled)", tiny_checkpoint("base"), "base",
               tiny_prec, "fp32"),
        Preset("tiny-instruct", "Falcon Mamba tiny (instruct, bundled)", tiny_checkpoint("instruct"),
               "instruct", tiny_prec, "fp32"),
        # Labels carry the release: Falcon3-Mamba (Dec 2024) continues Falcon Mamba (Aug 2024) in the
        # same architecture, so the two are told apart by name alone in every picker.
        Preset("7b-base", "Falcon Mamba 7B (base, 2024)", "tiiuae/falcon-mamba-7b", "base", big_prec, "bf16"),
        Preset("7b-instruct", "Falcon Mamba 7B Instruct (2024)", "tiiuae/falcon-mamba-7b-instruct", "instruct",
               big_prec, "bf16"),
        Preset("7b-base-4bit", "Falcon Mamba 7B (base, 2024, TII 4-bit)", "tiiuae/falcon-mamba-7b-4bit", "base",
               ("4bit",), "4bit", prequantized=True),
        Preset("7b-instruct-4bit", "Falcon Mamba 7B Instruct (2024, TII 4-bit)",
               "tiiuae/falcon-mamba-7b-instruct-4bit", "instruct", ("4bit",), "4bit", prequantized=True),
        Preset("falcon3-mamba-7b-base", "Falcon3-Mamba 7B (base, Dec 2024)", "tiiuae/Falcon3-Mamba-7B-Base",
               "base", big_prec, "bf16"),
        Preset("falcon3-mamba-7b-instruct", "Falcon3-Mamba 7B Instruct (Dec 2024)",
               "tiiuae/Falcon3-Mamba-7B-Instruct", "instruct", big_prec, "bf16"),
    ]
    return {p.key: p for p in rows}


PRESETS: dict[str, Preset] = _presets()


def extra_preset(spec: str) -> Preset:
    """A server-configured model: a hub id "org/name" or a local checkpoint directory (a path or a
    file:// URL, checked here), either one optionally followed by ":base" or ":instruct"."""
    source, kind = _split_kind(spec.strip())
    if is_local_source(source):
        return _local_preset(spec, source, kind)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source) or ".." in source:
        raise SettingsError(f"'{spec}' is neither a checkpoint directory nor a hub model id of the form "
                            "org/name[:base|:instruct]")
    kind = _kind(spec, source, kind)
    quant = bool(re.search(r"4bit|bnb|nf4", source, re.I))
    precisions = ("4bit",) if quant else ("bf16", "4bit", "fp32")
    return Preset(source, source, source, kind, precisions, precisions[0], prequantized=quant)


def _split_kind(spec: str) -> tuple[str, str]:
    """(source, kind) of "source[:kind]". The last colon: a file: URL or a path has colons of its own."""
    source, sep, kind = spec.rpartition(":")
    return (source, kind) if sep and re.fullmatch(r"[A-Za-z]+", kind) else (spec, "")


def _kind(spec: str, name: str, kind: str) -> str:
    """The kind given, else instruct when the model's name says instruct or chat, else base."""
    kind = kind or ("instruct" if re.search(r"instruct|chat", name, re.I) else "base")
    if kind not in KINDS:
        raise SettingsError(f"'{spec}': kind must be base or instruct, got '{kind}'")
    return kind


def _local_preset(spec: str, source: str, kind: str) -> Preset:
    """A local checkpoint directory as a preset keyed by the directory's name."""
    try:
        path = local_path(source)
        kind = _kind(spec, path.name, kind)
        config = check_checkpoint(path)
    except CheckpointError as e:
        raise SettingsError(f"'{spec}': {e}") from None
    quant = prequantized(config)
    precisions = ("4bit",) if quant else ("bf16", "4bit", "fp32")
    return Preset(path.name, f"{path.name} ({kind}, local checkpoint)", str(path), kind, precisions,
                  precisions[0], prequantized=quant)


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5e9' or a plain integer -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B)?\s*", text)
    if not m:
        raise ValueError(f"not a byte size: '{text}'")
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    unit = m.group(2) or ""
    if unit not in units:
        raise ValueError(f"unknown unit '{unit}' in '{text}'")
    return int(float(m.group(1)) * units[unit])


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class Settings:
    default_preset: str = _help("preset of the chat tab; 'auto': tiny-instruct on CPU, 7b-instruct on CUDA",
                                "auto")
    compare_presets: tuple[str, ...] = _help("two presets for the compare tab, comma separated; empty: auto",
                                             ())
    offered_presets: tuple[str, ...] = _help("the presets the app offers, comma separated; empty: all", ())
    served_models: tuple[str, ...] = _help("the presets clients may load (the model pickers, the /chat API, /v1), "
                                           "comma separated, each an offered preset; empty: auto, every offered "
                                           "preset whose smallest precision fits model_memory_budget_bytes "
                                           "(estimated from config.json or a known shape; nothing is downloaded)",
                                           ())
    device: str = _help("auto | cpu | cuda", "auto")
    precision: str = _help("auto | bf16 | fp32 | 4bit; auto: fp32 on CPU, each preset's default on CUDA",
                           "auto")
    cpu_threads: int = _help("torch CPU threads, set at start-up; 0: auto (1 when the models run on the CPU, "
                             "torch's default on CUDA)", 0)
    chunk_size: int = _help("tokens per prefill chunk (bounds prefill memory)", 256)
    max_batch: int = _help("replies decoded together in one batched step per model; 0: auto (32 on CPU, "
                           "64 on CUDA)", 0)
    prefill_budget: int = _help("prompt tokens read per scheduler step while other replies decode, so a long "
                                "read does not stall them; 0: auto (16 on CPU, 2048 on CUDA)", 0)
    checkpoint_tokens: int = _help("a long prompt keeps a state every this many tokens, so a request that "
                                   "shares its beginning resumes near where it diverges; 0: auto (1024 on CPU, "
                                   "4096 on CUDA)", 0)
    max_waiting: int = _help("requests waiting for a batch row before new ones are told the server is busy; "
                             "0: auto (as many as max_batch)", 0)
    max_new_tokens: int = _help("default reply length in tokens", 256)
    max_new_tokens_cap: int = _help("hard cap on reply length a browser may ask for", 2048)
    max_choices: int = _help("most replies one API request may ask for (n): one read, n rows", 8)
    max_input_chars: int = _help("longest chat message accepted", 16_000)
    max_upload_chars: int = _help("longest uploaded document (read by chunked prefill)", 2_000_000)
    max_import_bytes: int = _help("largest conversation file accepted for import", 512 * MiB)
    temp_file_age_s: int = _help("seconds after which exported conversations and uploaded files are deleted "
                                 "from the server's disk", 3600)
    system_prompt: str = _help("default system prompt of instruct conversations", "")
    session_budget_bytes: int = _help("bytes of recurrent states and snapshots kept for all sessions, in the "
                                      "prefix caches of all loaded models together", 4 * GiB)
    session_ttl_s: float = _help("seconds after which an idle conversation is dropped", 3600.0)
    max_sessions: int = _help("most browser sessions kept at once", 256)
    history_db: str = _help("SQLite file that keeps every browser's chat conversations across restarts (on a "
                            "Space with persistent storage: /data/fm-demo-history.sqlite3); empty: they are "
                            "kept in memory only, until the server stops", "")
    history_state_bytes: int = _help("bytes of recurrent states the history file keeps beside the "
                                     "transcripts, so a conversation resumes without reading its "
                                     "transcript again (the latest first; 0: transcripts only)", 1 * GiB)
    share_prefix_cache: bool = _help("share prefix states across sessions and API keys (a team server, a "
                                     "document demo): a hit reveals that someone sent the same text", False)
    # repr=False: the key never shows up where settings are printed or logged
    api_key: str = field(default="", repr=False, metadata={"help": (
        "bearer key the OpenAI-compatible API (/v1) requires; empty: the API is open, as on a public Space")})
    # repr=False: the secret never shows up where settings are printed or logged
    cache_secret: str = field(default="", repr=False, metadata={"help": (
        "key of the HMAC that derives prefix-cache namespaces from session hashes, API keys, users and "
        "addresses (serving/namespaces.py); empty: random per process. Set it alike on every process that "
        "serves one app (a cluster's ingress replicas), so a client keeps its namespace across them")})
    mcp_server: bool = _help("serve Gradio's MCP server at /gradio_api/mcp/ (the chat and compare tools)",
                             False)
    hot_states: int = _help("idle states kept on the GPU; the others wait on CPU", 8)
    offload_after_s: float = _help("seconds of idleness after which a GPU state moves to CPU", 60.0)
    model_memory_budget_bytes: int = _help("bytes of model weights kept loaded; 0: 90% of the device", 0)
    extra_models: tuple[str, ...] = _help("extra models, comma separated, each a hub id org/name or a local "
                                          "checkpoint directory (path or file:// URL), then :base or "
                                          ":instruct (default: instruct if the name says instruct or "
                                          "chat)", ())
    queue_max_size: int = _help("most requests waiting in the queue (set explicitly: ZeroGPU's default is 1)",
                                64)
    # Off ZeroGPU, reply events (chat, compare, long-context reads, the API endpoints) are not
    # bounded here: each model's scheduler admits, queues or refuses them. This bounds the rest
    # (the lab's measurements) everywhere, and every reply event on ZeroGPU.
    concurrency_limit: int = _help("events of one kind run at once where the scheduler does not decide: the lab's "
                                   "measurements; on ZeroGPU every reply (each holds a GPU slice)", 1)
    max_events_per_client: int = _help("requests one browser session (and, with limit_by_address, one client "
                                       "address) may have running or waiting at once: chat, compare, long-context "
                                       "and lab events, the /chat and /compare API (and /v1 completions, by "
                                       "address); more are refused as busy (/v1: 429); 0: no limit", 2)
    limit_by_address: bool = _help("also count each client address's requests, /v1 included, against "
                                   "max_events_per_client; the address is uvicorn's, taken from X-Forwarded-For "
                                   "only where FORWARDED_ALLOW_IPS trusts the proxy (else every visitor behind it "
                                   "shares one address)", False)
    token_alternatives: int = _help("likeliest tokens recorded with each chat reply token, for the token view "
                                    "and a rewind to any token (0: none; at most 20)", 5)
    lab_max_seconds: float = _help("longest time limit per model a lab decode run may ask for (seconds)", 1800.0)
    lab_max_tokens: int = _help("most tokens a lab run may generate, and the longest prompt its prefill sweep may "
                                "read; 0: the device's default maxima (16k / 32k on CPU, 256k on CUDA)", 0)
    lab_max_waiting: int = _help("lab runs waiting behind the one that runs (the lab runs one at a time, one per "
                                 "client) before more are refused", 4)
    # Empty / 0 leave the address to Gradio, which reads GRADIO_SERVER_NAME and GRADIO_SERVER_PORT
    # itself: Hugging Face Spaces set those, and a default of ours would shadow them.
    host: str = _help("address to listen on; empty: GRADIO_SERVER_NAME, else 127.0.0.1", "")
    port: int = _help("port to listen on; 0: GRADIO_SERVER_PORT, else the first free port from 7860", 0)

    CLI_GROUP = "server settings (each also read from FM_DEMO_<NAME>)"  # not a field: no annotation

    def __post_init__(self) -> None:
        self.compare_presets = tuple(self.compare_presets)
        self.offered_presets = tuple(self.offered_presets)
        self.served_models = tuple(self.served_models)
        self.extra_models = tuple(self.extra_models)
        # Not a field: derived from extra_models once, so a directory is read at start-up only.
        self._extras = self._extra_presets()
        self._check()
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        elif self.device == "cuda" and not _cuda_available():
            raise SettingsError("device: cuda was asked for but no CUDA device is visible")
        if self.default_preset == "auto":
            self.default_preset = "7b-instruct" if self.device == "cuda" else "tiny-instruct"
        if not self.compare_presets:
            self.compare_presets = _auto_compare(self.device)
        known = self.presets()
        for name, keys in (("default_preset", [self.default_preset]), ("compare_presets", self.compare_presets)):
            for key in keys:
                if key not in known:
                    raise SettingsError(f"{name}: unknown preset '{key}'; known: {', '.join(known)}")

    def _check(self) -> None:
        positive = ("chunk_size", "max_new_tokens", "max_new_tokens_cap", "max_choices", "max_input_chars",
                    "max_upload_chars", "max_import_bytes", "temp_file_age_s", "session_budget_bytes", "session_ttl_s",
                    "max_sessions", "queue_max_size", "concurrency_limit")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if self.lab_max_tokens and self.lab_max_tokens < 256:
            raise SettingsError("lab_max_tokens: must be 0 (the device's maxima) or >= 256, "
                                f"got {self.lab_max_tokens!r}")
        if not 0 <= self.token_alternatives <= 20:
            raise SettingsError(f"token_alternatives: must be from 0 to 20, got {self.token_alternatives!r}")
        if not self.lab_max_seconds >= 10:
            raise SettingsError(f"lab_max_seconds: must be >= 10, got {self.lab_max_seconds!r}")
        for name in ("cpu_threads", "history_state_bytes", "hot_states", "offload_after_s",
                     "model_memory_budget_bytes", "max_batch",
                     "prefill_budget", "max_waiting", "checkpoint_tokens", "max_events_per_client", "lab_max_tokens",
                     "lab_max_waiting"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port: must be 0 (Gradio's choice) to 65535, got {self.port!r}")
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise SettingsError(f"max_new_tokens: {self.max_new_tokens} exceeds max_new_tokens_cap "
                                f"{self.max_new_tokens_cap}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"device: must be auto, cpu or cuda, got '{self.device}'")
        if self.precision not in ("auto", *PRECISIONS):
            raise SettingsError(f"precision: must be auto, {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.compare_presets and len(self.compare_presets) != 2:
            raise SettingsError(f"compare_presets: needs exactly two presets, got {list(self.compare_presets)}")
        every = {**PRESETS, **self._extras}
        for key in self.offered_presets:
            if key not in every:
                raise SettingsError(f"offered_presets: unknown preset '{key}'; known: {', '.join(every)}")
        offered = [k for k in every if not self.offered_presets or k in self.offered_presets]
        for key in self.served_models:
            if key not in offered:
                raise SettingsError(f"served_models: '{key}' is not an offered preset; offered: {', '.join(offered)}")

    def _extra_presets(self) -> dict[str, Preset]:
        """extra_models as presets by key; two different models may not share a key."""
        out: dict[str, Preset] = {}
        for spec in self.extra_models:
            try:
                p = extra_preset(spec)
            except SettingsError as e:
                raise SettingsError(f"extra_models: {e}") from None
            other = PRESETS.get(p.key) or out.get(p.key)
            if other is not None and other.source != p.source:
                raise SettingsError(f"extra_models: '{p.key}' would name both {other.source} and {p.source}; "
                                    "a local checkpoint is known by its directory's name, so rename one")
            out[p.key] = p
        return out

    # -- presets -----------------------------------------------------------------------------
    def presets(self) -> dict[str, Preset]:
        """The built-in presets plus the server's extra models, by key."""
        every = {**PRESETS, **self._extras}
        return {k: p for k, p in every.items() if not self.offered_presets or k in self.offered_presets}

    def preset(self, key: str) -> Preset:
        try:
            return self.presets()[key]
        except KeyError:
            raise SettingsError(f"unknown model preset '{key}'") from None

    def precision_for(self, preset: Preset | str) -> str:
        """The precision a preset loads in when the request names none."""
        p = self.preset(preset) if isinstance(preset, str) else preset
        if self.precision in p.precisions:
            return self.precision
        if self.device == "cpu" and "fp32" in p.precisions:
            return "fp32"
        return p.default_precision

    def torch_threads(self) -> int | None:
        """Threads for torch.set_num_threads at start-up; None leaves torch's default.

        Auto is 1 on the CPU: decoding one sequence is a long chain of small ops, where OpenMP's
        fork/join per op costs more than a second core saves, and on shared cores (free Spaces,
        busy hosts) its spinning threads contend with everything else: on a busy 2-core machine
        a 64-token reply of a tiny model took 4 to 70 times longer on two threads than on one
        (0.19-5.5 s vs 0.05-0.08 s). Set it higher for
        large models on a dedicated many-core CPU. On CUDA the CPU only tokenizes and keeps books.
        """
        if self.cpu_threads:
            return self.cpu_threads
        return 1 if self.device == "cpu" else None

    def batch_size_limit(self) -> int:
        """Rows of one model's batched decode step (continuous batching, serving/scheduler.py)."""
        return self.max_batch or (64 if self.device == "cuda" else 32)

    def prefill_budget_tokens(self) -> int:
        """Prompt tokens a scheduler step reads while rows decode (also the size of every prompt
        piece): a step's decode then waits for one piece. On the CPU (one thread) a 16-token piece
        costs about two decode steps of 8 rows (CPU time, tiny shape 16 vs 8 ms, a 22M model 81 vs
        43 ms), so a document read leaves the other streams about 3x their inter-token latency.
        64-token pieces (48 and 234 ms) cost them 6-7x for a read alone ~30% faster; 8-token pieces
        2.3-2.6x for one ~25% slower (bench/serve.py --budgets). A bigger model on the CPU may want 8."""
        return self.prefill_budget or (2048 if self.device == "cuda" else 16)

    def checkpoint_interval(self) -> int:
        """Tokens between the states a long prompt leaves in the prefix cache (serving/scheduler.py).
        Each costs one state (the 7B: about 35 MiB; the tiny model 152 KiB) and saves re-reading
        up to this many tokens: 1024 on the CPU is ~4 s of the 7B's prefill there, 4096 on a GPU
        well under a second."""
        return self.checkpoint_tokens or (4096 if self.device == "cuda" else 1024)

    def batch_waiting_limit(self) -> int:
        return self.max_waiting or self.batch_size_limit()

    def event_concurrency(self) -> int:
        """Requests one model's scheduler holds at once (every batch row and waiting place): what
        the /v1 API's worker threads are sized for."""
        return self.batch_size_limit() + self.batch_waiting_limit()

    def clamp_new_tokens(self, n: int | None) -> int:
        return self.max_new_tokens if n is None else max(1, min(int(n), self.max_new_tokens_cap))

    # -- sources -----------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from FM_DEMO_* variables (then `overrides`); errors name the variable."""
        return _build(cls, {**_env_values(cls, env), **overrides}, lambda name: ENV_PREFIX + name.upper())

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        group = parser.add_argument_group(cls.CLI_GROUP)
        for f in fields(cls):
            # argparse %-formats help texts, so a literal % is written %%
            text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                               metavar=f.name.upper(), help=text)
        return parser

    @classmethod
    def from_cli(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """Environment first, then the flags given on the command line; errors name the flag."""
        given = {f.name: _parse_field(f, getattr(args, f.name), _flag(f.name))
                 for f in fields(cls) if getattr(args, f.name, None) is not None}
        return _build(cls, {**_env_values(cls, env), **given}, _flag)

    def replace(self, **changes) -> Settings:
        return replace(self, **changes)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _auto_compare(device: str) -> tuple[str, str]:
    if device != "cuda":
        return ("tiny-base", "tiny-instruct")
    import torch

    if torch.cuda.get_device_properties(0).total_memory >= COMPARE_BF16_MIN_GPU_BYTES:
        return ("7b-base", "7b-instruct")
    return ("7b-base-4bit", "7b-instruct-4bit")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_values(cls, env: Mapping[str, str] | None) -> dict:
    env = os.environ if env is None else env
    out = {}
    for f in fields(cls):
        var = ENV_PREFIX + f.name.upper()
        if env.get(var, "").strip():
            out[f.name] = _parse_field(f, env[var], var)
    return out


def _parse_field(f, text: str, source: str):
    kind, text = type(f.default), str(text).strip()
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("use true or false")
            return low in ("1", "true", "yes", "on")
        if kind is tuple:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        if kind is int:
            return parse_bytes(text) if f.name.endswith("_bytes") else int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError as e:
        raise SettingsError(f"{source}: expected {kind.__name__}, got '{text}' ({e})") from None


def _build(cls, values: dict, name_of) -> Settings:
    try:
        return cls(**values)
    except SettingsError as e:
        name, _, rest = str(e).partition(":")
        if name in {f.name for f in fields(cls)}:
            raise SettingsError(f"{name_of(name)}:{rest}") from None
        raise
