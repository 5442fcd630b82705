"""Engine equivalence: chunked, stateful processing must equal transformers' full forward pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fm_demo.engine import Engine, SamplingParams, State, StateError, tiny_model

ATOL = 1e-4  # fp32 tolerance stated in the design: chunking only reorders float additions

CONFIGS = {
    "h64-l2": dict(hidden_size=64, num_hidden_layers=2),
    "h128-l3-n8-k3": dict(hidden_size=128, num_hidden_layers=3, state_size=8, conv_kernel=3),
    "h64-l2-k4-r16-bias": dict(hidden_size=64, num_hidden_layers=2, time_step_rank=16, use_bias=True),
}


def _full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # [B, T, V]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_ids(request):
    model = tiny_model(seed=1, **CONFIGS[request.param])
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2))
    return model, ids, _full_logits(model, ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_chunked_prefill_equals_full_forward(model_and_ids, chunk):
    model, ids, ref = model_and_ids
    engine = Engine(model, chunk_size=chunk)
    state = engine.new_state(batch_size=2)
    out = engine.prefill(ids, state, all_logits=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert state.seqlen == ids.shape[1]


@pytest.mark.parametrize("splits", [[5, 1, 30, 34], [1, 1, 1, 67], [33, 37], [69, 1]])
def test_uneven_prefill_calls_equal_full_forward(model_and_ids, splits):
    model, ids, ref = model_and_ids
    engine = Engine(model, chunk_size=8)
    state, outs, start = engine.new_state(2), [], 0
    for n in splits:
        outs.append(engine.prefill(ids[:, start:start + n], state, all_logits=True))
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=ATOL, rtol=0)


def test_last_logits_match_all_logits(model_and_ids):
    model, ids, ref = model_and_ids
    engine = Engine(model, chunk_size=16)
    last = engine.prefill(ids, engine.new_state(2))
    torch.testing.assert_close(last, ref[:, -1], atol=ATOL, rtol=0)


def test_teacher_forced_steps_equal_full_forward(model_and_ids):
    model, ids, ref = model_and_ids
    engine = Engine(model)
    state = engine.new_state(2)
    outs = [engine.step(ids[:, t], state) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.stack(outs, dim=1), ref, atol=ATOL, rtol=0)


def test_prefill_concat_gives_same_state_as_two_prefills(model_and_ids):
    model, ids, _ = model_and_ids
    engine = Engine(model, chunk_size=5)
    whole = engine.new_state(2)
    engine.prefill(ids, whole)
    parts = engine.new_state(2)
    engine.prefill(ids[:, :23], parts)
    engine.prefill(ids[:, 23:], parts)
    torch.testing.assert_close(parts.ssm, whole.ssm, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.conv, whole.conv, atol=1e-5, rtol=0)
    assert parts.seqlen == whole.seqlen == ids.shape[1]


def test_transformers_multi_token_cache_continuation_is_the_gap_we_close():
    """Documents why the engine exists: our continuation is exact where the library's is not."""
    model = tiny_model(seed=3)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(4))
    ref = _full_logits(model, ids)
    engine = Engine(model, chunk_size=8)
    state = engine.new_state()
    engine.prefill(ids[:, :16], state)
    ours = engine.prefill(ids[:, 16:], state, all_logits=True)
    torch.testing.assert_close(ours, ref[:, 16:], atol=ATOL, rtol=0)


def test_state_size_is_constant_in_context_length():
    engine = Engine(tiny_model(seed=0))
    state = engine.new_state()
    before = state.nbytes
    engine.prefill(torch.randint(0, 512, (1, 300)), state)
    assert state.nbytes == before == engine.state_nbytes()


def test_state_save_load_round_trips_exactly(tmp_path):
    engine = Engine(tiny_model(seed=0))
    state = engine.new_state()
    engine.prefill(torch.randint(0, 512, (1, 40)), state)
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = State.load(path, like=engine.new_state())
    assert torch.equal(loaded.conv, state.conv) and torch.equal(loaded.ssm, state.ssm)
    assert loaded.seqlen == state.seqlen and loaded.signature == state.signature
    assert loaded.owned  # fresh, aligned storage: safetensors' own buffers need not be
    nxt = torch.tensor([7])
    torch.testing.assert_close(engine.step(nxt, loaded), engine.step(nxt, state.clone()), atol=0, rtol=0)


def _misaligned(t: torch.Tensor, offset_bytes: int = 8) -> torch.Tensor:
    """A copy of `t` whose data starts `offset_bytes` past a 64-byte boundary (like a file buffer)."""
    pad = offset_bytes // t.element_size()
    flat = torch.empty(t.numel() + 64, dtype=t.dtype)
    start = next(i for i in range(64) if (flat.data_ptr() + i * t.element_size()) % 64 == offset_bytes)
    out = flat[start:start + t.numel()].view(t.shape).copy_(t)
    assert out.data_ptr() % 64 == offset_bytes and pad > 0
    return out


def test_states_from_unaligned_bytes_continue_bit_for_bit():
    """Every state made from foreign buffers continues exactly like the original on any CPU.

    The step from an unaligned buffer may take another vectorised path; whether it rounds
    differently depends on the CPU, so the check is on the layout the engine computes from.
    """
    engine = Engine(tiny_model(seed=0))
    state = engine.new_state()
    engine.prefill(torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1)), state)
    tensors = {"conv": _misaligned(state.conv), "ssm": _misaligned(state.ssm)}
    restored = State.from_parts(tensors, state.metadata(), like=engine.new_state())
    assert restored.owned and restored.conv.data_ptr() % 64 == 0 and restored.ssm.data_ptr() % 64 == 0
    # a state handed to the engine in foreign storage (e.g. unpickled from a GPU worker) is owned first
    foreign = State(_misaligned(state.conv), _misaligned(state.ssm), state.signature, state.seqlen)
    assert not foreign.owned
    nxt = torch.tensor([7])
    ref = engine.step(nxt, state.clone())
    torch.testing.assert_close(engine.step(nxt, foreign), ref, atol=0, rtol=0)
    assert foreign.owned
    torch.testing.assert_close(engine.step(nxt, restored), ref, atol=0, rtol=0)


def test_state_load_refuses_other_model_and_garbage(tmp_path):
    a, b = Engine(tiny_model(seed=0)), Engine(tiny_model(seed=5))
    path = tmp_path / "a.safetensors"
    a.new_state().save(path)
    with pytest.raises(StateError, match="another model"):
        State.load(path, like=b.new_state())
    other_shape = Engine(tiny_model(seed=0, num_hidden_layers=3))
    with pytest.raises(StateError):
        State.load(path, like=other_shape.new_state())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="not a readable state"):
        State.load(junk, like=a.new_state())


def test_bad_inputs_raise_clear_errors():
    engine = Engine(tiny_model(seed=0))
    state = engine.new_state()
    with pytest.raises(ValueError, match="empty"):
        engine.prefill(torch.zeros(1, 0, dtype=torch.long), state)
    with pytest.raises(TypeError, match="int64"):
        engine.prefill(torch.zeros(1, 4), state)
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        engine.prefill(torch.zeros(4, dtype=torch.long), state)
    with pytest.raises(ValueError, match="must be in"):
        engine.prefill(torch.tensor([[512]]), state)
    with pytest.raises(StateError, match="batch size"):
        engine.prefill(torch.zeros(2, 3, dtype=torch.long), state)
    foreign = Engine(tiny_model(seed=9)).new_state()
    with pytest.raises(StateError, match="another model"):
        engine.step(torch.tensor([1]), foreign)
    with pytest.raises(TypeError, match="Falcon Mamba"):
        Engine(SimpleNamespace(config=SimpleNamespace(model_type="llama")))
    assert state.seqlen == 0  # nothing was read by the refused calls


def _greedy_reference(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by re-running the full forward each token (no cache at all)."""
    ids = prompt.clone()
    out = []
    for _ in range(n):
        nxt = _full_logits(model, ids)[:, -1].argmax(-1)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def test_stream_greedy_equals_uncached_reference_and_keeps_state_consistent():
    model = tiny_model(seed=11)
    engine = Engine(model, chunk_size=4)
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    state = engine.new_state()
    events = list(engine.stream(prompt, state, SamplingParams(), max_new_tokens=12))
    assert [e.token_id for e in events] == _greedy_reference(model, prompt, 12)
    assert events[-1].finish_reason == "length" and state.seqlen == 9 + 12
    assert events[-1].metrics.new_tokens == 12 and events[-1].metrics.ttft_s > 0


def test_stream_stopped_early_leaves_state_with_exactly_the_yielded_tokens():
    model = tiny_model(seed=11)
    engine = Engine(model)
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    state = engine.new_state()
    stream = engine.stream(prompt, state, max_new_tokens=50)
    got = [next(stream).token_id for _ in range(4)]
    stream.close()
    assert state.seqlen == 6 + 4
    fresh = engine.new_state()
    engine.prefill(torch.cat([prompt, torch.tensor([got])], dim=1), fresh)
    torch.testing.assert_close(state.ssm, fresh.ssm, atol=1e-5, rtol=0)


def test_stream_stops_on_stop_token_and_seeded_sampling_reproduces():
    engine = Engine(tiny_model(seed=2))
    prompt = torch.tensor([[3, 4, 5]])
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    run = lambda: [e.token_id for e in engine.stream(prompt, engine.new_state(), params, max_new_tokens=20)]
    first = run()
    assert first == run()
    stop = first[5]
    events = list(engine.stream(prompt, engine.new_state(), params, 20, stop_token_ids=[stop]))
    assert events[-1].token_id == stop and events[-1].finish_reason == "stop"
    assert len(events) == first.index(stop) + 1


def test_4bit_model_runs_through_engine_on_cpu(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    del bnb
    model = tiny_model(seed=0, hidden_size=128, num_hidden_layers=2)
    model.save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu")
    assert "4bit" in type(q.backbone.layers[0].mixer.in_proj).__name__.lower()
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    engine = Engine(q, chunk_size=6)
    chunked = engine.prefill(ids, engine.new_state(), all_logits=True)
    state = engine.new_state()
    stepped = torch.stack([engine.step(ids[:, t], state) for t in range(ids.shape[1])], dim=1)
    # Same quantized weights on both paths: only op order differs.
    torch.testing.assert_close(chunked, stepped, atol=1e-3, rtol=0)
    # transformers' own 4-bit forward is no reference here: bitsandbytes' CPU matmul returns wrong
    # values for strided inputs, which its mixer passes. Compare with the fp32 weights instead.
    full = _full_logits(model, ids)
    err = (chunked - full).norm() / full.norm()
    assert err < 0.35, f"4-bit logits too far from fp32: relative error {err:.3f}"


def test_4bit_batched_decode_matches_each_row_alone(tmp_path):
    """bitsandbytes' CPU 4-bit matmul mishandles strided inputs: rows must not leak into each other."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(seed=0, hidden_size=128, num_hidden_layers=2).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu")
    engine = Engine(q)
    ids = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(3))
    both = engine.new_state(3)
    batched = torch.stack([engine.step(ids[:, t], both) for t in range(6)], dim=1)
    for row in range(3):
        alone = engine.new_state(1)
        single = torch.stack([engine.step(ids[row:row + 1, t], alone) for t in range(6)], dim=1)
        torch.testing.assert_close(batched[row:row + 1], single, atol=1e-4, rtol=0)


def test_incremental_detokenization_adds_up_to_the_full_decode():
    from transformers import AutoTokenizer

    from fm_demo.engine import Detokenizer
    from fm_demo.tiny import checkpoint_path

    tok = AutoTokenizer.from_pretrained(str(checkpoint_path("instruct")))
    text = "Falcon Mamba reads  long texts: état, naïve, 東京, 🐍 emoji!\nNew line, 123 + 45 = 168."
    rand = torch.randint(3, tok.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    ids = tok(text)["input_ids"] * 20 + rand.tolist()
    detok = Detokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full.rstrip("\ufffd")
    assert all("\ufffd" not in p for p in pieces[: len(ids) - 300])


def test_model_forward_gradients_match_transformers():
    """Training runs through the engine's forward: its gradients must be transformers' own."""
    from fm_demo.engine import model_forward

    model = tiny_model(seed=4, num_hidden_layers=2).train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    loss_ours = model_forward(model, ids).logsumexp(-1).mean()
    ours = torch.autograd.grad(loss_ours, list(model.parameters()))
    loss_ref = model(ids).logits.logsumexp(-1).mean()
    ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-5, rtol=0)
    for (name, _), g, r in zip(model.named_parameters(), ours, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
