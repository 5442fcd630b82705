"""The recurrent state of a Falcon Mamba model: constant size whatever the context length.

Shapes: L layers, B batch, D inner channels, K conv width, N ssm state size.
    conv: [L, B, D, K-1]  the last K-1 conv inputs of every layer (model dtype)
    ssm:  [L, B, D, N]    the selective-scan state of every layer (always fp32, as the fused
                          kernels accumulate it; bf16 would drift over long contexts)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

FORMAT_VERSION = 1
# CPU kernels take other vectorised paths (and so round differently) on storage that is not
# 64-byte aligned; torch's CPU allocator aligns to 64, safetensors' and pickles' buffers need not.
ALIGN_BYTES = 64


class StateError(ValueError):
    """A state that does not fit the model or the request it is used with."""


def model_signature(model) -> str:
    """Identifies a model's architecture and weights well enough to refuse a foreign state.

    Shape fields come from the config; the weight fingerprint uses a corner of the embeddings and
    A_log of the first and last layer, rounded to bf16, so the same checkpoint in fp32, bf16 or
    4-bit (bitsandbytes quantizes neither) shares a signature while base and instruct differ.
    """
    cfg = model.config
    fields = [cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
              cfg.state_size, cfg.conv_kernel, cfg.vocab_size]
    h = hashlib.sha256(json.dumps(fields).encode())
    layers = model.backbone.layers
    parts = [model.backbone.embeddings.weight[:4, :16]] + [l.mixer.A_log[:4] for l in (layers[0], layers[-1])]
    for p in parts:
        h.update(p.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def zero_state(config, batch_size: int = 1, conv_dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The empty context's tensors, the one place their shapes are written: conv [L, B, D, K-1] in
    the weights' dtype, ssm [L, B, D, N] in fp32."""
    L, D = config.num_hidden_layers, config.intermediate_size
    conv = torch.zeros(L, batch_size, D, config.conv_kernel - 1, device=device, dtype=conv_dtype)
    ssm = torch.zeros(L, batch_size, D, config.state_size, device=device, dtype=torch.float32)
    return conv, ssm


def state_bytes(config, conv_dtype: torch.dtype = torch.bfloat16, ssm_dtype: torch.dtype = torch.float32,
                batch_size: int = 1) -> int:
    """Bytes of one State for `config`: conv [L, B, D, K-1] + ssm [L, B, D, N], whatever the context.

    With the engine's fp32 ssm and a bf16 conv that is 35 MiB for the 7B; 19 MiB if everything
    were bf16 (the conv keeps K-1 = 3 inputs per channel).
    """
    per_layer = config.intermediate_size * ((config.conv_kernel - 1) * conv_dtype.itemsize
                                            + config.state_size * ssm_dtype.itemsize)
    return config.num_hidden_layers * per_layer * batch_size


def owned(t: Tensor) -> Tensor:
    """`t` in storage of its own: contiguous, offset 0, freshly allocated (so aligned as the allocator
    aligns every state the engine makes). Continuing from it gives the same bits as from the original.
    """
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def is_owned(t: Tensor) -> bool:
    """True when `t` lays out like a freshly allocated tensor (contiguous and aligned)."""
    return t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0


@dataclass
class State:
    conv: Tensor  # [L, B, D, K-1]
    ssm: Tensor  # [L, B, D, N] fp32
    signature: str
    seqlen: int = 0  # tokens read into this state so far

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    @property
    def device(self) -> torch.device:
        return self.ssm.device

    @property
    def owned(self) -> bool:
        return is_owned(self.conv) and is_owned(self.ssm)

    def own(self) -> State:
        """Make the tensors fresh, aligned storage if they are not (in place; returns self).

        Every path that turns bytes into a State goes through here (load, import, a state back from
        a GPU worker), so a restored conversation continues bit for bit like the original.
        """
        if not is_owned(self.conv):
            self.conv = owned(self.conv)
        if not is_owned(self.ssm):
            self.ssm = owned(self.ssm)
        return self

    def clone(self) -> State:
        return State(self.conv.clone(), self.ssm.clone(), self.signature, self.seqlen)

    def to(self, device: torch.device | str) -> State:
        return State(self.conv.to(device), self.ssm.to(device), self.signature, self.seqlen)

    def copy_(self, other: State) -> State:
        """Overwrite this state with `other` in place (keeps buffers, e.g. for CUDA graphs)."""
        self.check_like(other)
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        self.seqlen = other.seqlen
        return self

    def check_like(self, other: State) -> None:
        if other.signature != self.signature:
            raise StateError("this state belongs to another model")
        if other.conv.shape != self.conv.shape or other.ssm.shape != self.ssm.shape:
            raise StateError(
                f"state shapes differ: conv {tuple(other.conv.shape)} vs {tuple(self.conv.shape)}, "
                f"ssm {tuple(other.ssm.shape)} vs {tuple(self.ssm.shape)}"
            )

    def metadata(self) -> dict[str, str]:
        return {"format": "fm-demo-state", "version": str(FORMAT_VERSION),
                "signature": self.signature, "seqlen": str(self.seqlen)}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"conv": self.conv.contiguous().cpu(), "ssm": self.ssm.contiguous().cpu()},
                  str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path, like: State, device: torch.device | str | None = None) -> State:
        """Load a saved state, checking it against `like` (a fresh state of the target model)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt files
            raise StateError(f"not a readable state file: {e}") from e
        return cls.from_parts(tensors, meta, like, device)

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, str], like: State,
                   device: torch.device | str | None = None) -> State:
        if meta.get("format") != "fm-demo-state":
            raise StateError("not a Falcon Mamba demo state file")
        if meta.get("version") != str(FORMAT_VERSION):
            raise StateError(f"state format version {meta.get('version')} is not supported")
        if set(tensors) != {"conv", "ssm"}:
            raise StateError(f"state file has tensors {sorted(tensors)}, expected conv and ssm")
        try:
            seqlen = int(meta.get("seqlen", "x"))
        except ValueError as e:
            raise StateError("state file has no valid token count") from e
        conv, ssm = tensors["conv"], tensors["ssm"]
        if conv.dtype != like.conv.dtype or ssm.dtype != like.ssm.dtype:
            conv, ssm = conv.to(like.conv.dtype), ssm.to(like.ssm.dtype)
        if not (torch.isfinite(ssm).all() and torch.isfinite(conv.float()).all()):
            raise StateError("state file holds non-finite values")
        state = cls(conv, ssm, meta.get("signature", ""), seqlen)
        like.check_like(state)
        # fresh storage on the target device: safetensors' buffers are not 64-byte aligned
        return cls(owned(conv.to(device or like.device)), owned(ssm.to(device or like.device)),
                   state.signature, seqlen)
