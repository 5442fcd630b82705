"""Stateful Falcon Mamba inference: exact chunked prefill from any state, steps and streaming."""

from .decode import DecodeOptions, DecodeRow, Detokenizer, StreamMetrics, TokenEvent
from .engine import DEFAULT_CHUNK, Engine
from .kernels import REFERENCE, OpSet, select_ops
from .mixer import model_forward
from .sampling import SamplingParams, sample
from .state import State, StateError, model_signature
from .tiny_config import tiny_config, tiny_model

__all__ = [
    "DEFAULT_CHUNK", "DecodeOptions", "DecodeRow", "Detokenizer", "Engine", "OpSet", "REFERENCE", "SamplingParams", "State", "StateError",
    "StreamMetrics", "TokenEvent", "model_forward", "model_signature", "sample", "select_ops",
    "tiny_config", "tiny_model",
]
