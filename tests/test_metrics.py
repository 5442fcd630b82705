"""Metrics: the KV-cache reference, the Mamba state size, memory probes, reply metrics."""

from __future__ import annotations

import json

import torch

from fm_demo.engine import Engine, tiny_model
from fm_demo.engine.state import state_bytes
from fm_demo.metrics import KV_REFERENCE, ReplyMetrics, device_memory, kv_cache_bytes, rate


def test_kv_reference_is_128_kib_per_token():
    assert KV_REFERENCE.bytes_per_token == 128 * 1024
    assert kv_cache_bytes(8192) == 2 ** 30 and kv_cache_bytes(131072) == 16 * 2 ** 30


def test_state_bytes_match_the_engine_and_the_7b_reference():
    model = tiny_model(seed=0)
    engine = Engine(model)
    assert state_bytes(model.config, conv_dtype=torch.float32) == engine.new_state().nbytes
    assert state_bytes(model.config, conv_dtype=torch.float32) == engine.state_nbytes()
    from kernels_check.models import config_7b

    cfg = config_7b()  # the published tiiuae/falcon-mamba-7b config, shipped with kernels_check
    all_bf16 = state_bytes(cfg, torch.bfloat16, torch.bfloat16)
    # 19 MiB: K-1 = 3 conv inputs are state (the reference's "about 20 MiB" counts all 4)
    assert all_bf16 == 64 * 8192 * (3 + 16) * 2
    assert state_bytes(cfg) == 64 * 8192 * (3 * 2 + 16 * 4)  # fp32 ssm as the engine keeps it


def test_reply_metrics_rates_and_dict():
    m = ReplyMetrics(prefilled_tokens=100, prefill_s=0.5, new_tokens=11, decode_s=2.0, context_tokens=1000)
    assert m.prefill_tok_s == 200 and m.decode_tok_s == 5.0  # the first token is not a decode step
    d = m.as_dict()
    assert d["kv_cache_equiv_bytes"] == 1000 * 128 * 1024 and d["cache_hit"] is True
    assert json.loads(json.dumps(d)) == d
    assert ReplyMetrics(new_tokens=1, decode_s=1.0).decode_tok_s == 0 and rate(5, 0) == 0


def test_memory_probe_sees_an_allocation():
    now, peak = device_memory("cpu")
    assert 0 < now <= peak
    big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    after, _ = device_memory("cpu")
    assert after - now > 32 * 2 ** 20
    del big
