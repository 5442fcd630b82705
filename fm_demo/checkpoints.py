"""Local checkpoint directories served as extra models: where a source names one, and its checks.

FM_DEMO_EXTRA_MODELS may name a directory instead of a hub id, e.g. a fine-tuned Falcon Mamba:
an absolute or relative path, or a file:// URL. The directory must hold what `save_pretrained`
writes for a transformers Falcon Mamba (or Mamba) model and its tokenizer. It is checked when the
settings are read, so a wrong path stops the server at start-up with a message that says what is
missing, instead of failing a visitor's first message. Only the server's configuration names
directories; the browser picks among the presets made from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

MODEL_TYPES = ("falcon_mamba", "mamba")  # config.json model_type the engine runs
# What from_pretrained reads: one weights file or the index of a sharded save, in either format.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# A fast tokenizer (tokenizer.json), a SentencePiece model, or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_PATH_PREFIXES = ("/", "./", "../", "~", "file:")


class CheckpointError(ValueError):
    """A local source that is not a servable checkpoint; the message says what is missing."""


def is_local_source(source: str) -> bool:
    """Whether `source` names a directory rather than a hub id.

    A path that starts with /, ./, ../ or ~, a file: URL, or any other name of an existing
    directory (transformers' from_pretrained also prefers a directory to a hub id of that name).
    """
    return source.startswith(_PATH_PREFIXES) or source in (".", "..") or Path(source).is_dir()


def local_path(source: str) -> Path:
    """The absolute directory a local source names: file:// URLs decoded, ~ expanded, relative
    paths taken from the working directory at start-up."""
    if source.startswith("file:"):
        url = urlparse(source)
        if url.netloc not in ("", "localhost"):
            raise CheckpointError(f"file URL {source} names host '{url.netloc}'; a local checkpoint is "
                                  "file:///absolute/path")
        return Path(unquote(url.path)).resolve()
    return Path(source).expanduser().resolve()


def check_checkpoint(path: Path) -> dict:
    """The config.json of the Falcon Mamba checkpoint at `path`; raises CheckpointError naming
    what is missing or wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory" if path.exists()
                              else f"no checkpoint directory at {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json, so it is not a transformers checkpoint "
                              "(model.save_pretrained(DIR) writes one)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} cannot be read as JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path} holds a {model_type or 'untyped'} model (config.json model_type); "
                              "only Falcon Mamba (falcon_mamba) and Mamba (mamba) checkpoints can be served")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path} has no weights ({', '.join(WEIGHT_FILES)}); "
                              "model.save_pretrained(DIR) writes them")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the one the "
                              "model was trained with there: tokenizer.save_pretrained(DIR)")
    return config


def prequantized(config: dict) -> bool:
    """Whether the checkpoint's weights are already bitsandbytes 4-bit (then only 4-bit loads)."""
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))
