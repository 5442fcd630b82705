"""Sampling functions obey their contracts."""

from __future__ import annotations

import pytest
import torch

from fm_demo.engine.sampling import (
    SamplingParams, apply_repetition_penalty, apply_temperature, make_generator, sample,
    top_k_filter, top_p_filter,
)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


def test_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [1, 3]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero()[:, 1].tolist()
    assert kept(0.5) == [0]
    assert kept(0.6) == [0, 1]
    assert kept(0.95) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(0.01) == [0]  # the most likely token always survives
    assert kept(1e-300) == [0]  # even where p rounds to 0 in float32


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 4.0]])
    assert apply_temperature(logits, 2.0).tolist() == [[1.0, 2.0]]


def test_seed_reproduces_and_samples_follow_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, params, make_generator(params, "cpu"))
    b = sample(logits, params, make_generator(params, "cpu"))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_sampling_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0, 4.0]]).repeat(500, 1)
    params = SamplingParams(temperature=1.5, top_k=2, seed=1)
    picks = set(sample(logits, params, make_generator(params, "cpu")).tolist())
    assert picks <= {3, 4}


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(repetition_penalty=0.0), dict(temperature=1e-300),
                                    dict(seed=2**64), dict(top_k=True)])
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
