"""ModelManager: real loads through transformers, LRU under a memory budget, clear load errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny_fixtures import bundled_checkpoint

from fm_demo.models import ModelLoadError, ModelManager, estimate_model_bytes
from fm_demo.settings import PRESETS, Preset, Settings

TINY_PREC = ("fp32", "bf16", "4bit")



@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    tiny = {k: Preset(k, f"tiny {k}", bundled_checkpoint(k), k, TINY_PREC, "fp32")
            for k in ("instruct", "base")}
    return {**tiny, "7b": PRESETS["7b-instruct"],
            "missing": Preset("missing", "missing tiny", "/nonexistent/falcon-mamba-tiny", "base", TINY_PREC, "fp32"),
            "nohub": Preset("nohub", "a model that is not there", "fm-demo-tests/no-such-model", "base",
                            TINY_PREC, "fp32")}


@pytest.fixture()
def manager(presets):
    return ModelManager(Settings(device="cpu"), presets=presets)


def test_load_reports_progress_and_reuses(manager):
    seen = []
    lm = manager.get("instruct", progress=lambda f, msg: seen.append((f, msg)))
    assert lm.key == ("instruct", "fp32") and lm.kind == "instruct" and lm.nbytes > 0
    assert lm.engine.dtype == torch.float32 and lm.tokenizer.eos_token == "<|im_end|>"
    assert seen[0][0] == 0.0 and seen[-1][0] == 1.0 and "ready" in seen[-1][1]
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert manager.get("instruct") is lm and manager.loaded() == [lm]
    bf16 = manager.get("instruct", "bf16")
    assert bf16 is not lm and bf16.engine.dtype == torch.bfloat16 and len(manager.loaded()) == 2


def test_concurrent_requests_share_one_load(manager):
    got, errors = [], []

    def worker():
        try:
            got.append(manager.get("base"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({id(x) for x in got}) == 1 and len(manager.loaded()) == 1


def test_budget_keeps_two_or_evicts_least_recent(presets):
    one = ModelManager(Settings(device="cpu"), presets=presets).get("instruct").nbytes
    roomy = ModelManager(Settings(device="cpu", model_memory_budget_bytes=3 * one), presets=presets)
    a, b = roomy.get("instruct"), roomy.get("base")
    assert roomy.loaded() == [a, b]  # compare needs both at once
    tight = ModelManager(Settings(device="cpu", model_memory_budget_bytes=int(1.5 * one)), presets=presets)
    dropped = []
    tight.on_unload(dropped.append)
    a = tight.get("instruct")
    tight.get("base")
    assert [lm.key for lm in tight.loaded()] == [("base", "fp32")] and dropped == [a]
    assert not tight.is_loaded(a)


@pytest.mark.parametrize("key, precision, reason, words", [
    ("gpt-5", None, "unknown_model", "Unknown model"),
    ("instruct", "int8", "bad_precision", "comes in"),
    ("missing", None, "not_found", "No checkpoint"),
    ("nohub", None, ("network", "not_found"), "Hugging Face Hub"),
])
def test_load_errors_are_clear_and_typed(manager, key, precision, reason, words):
    with pytest.raises(ModelLoadError, match=words) as info:
        manager.get(key, precision)
    assert info.value.reason in ((reason,) if isinstance(reason, str) else reason)
    assert manager.get("instruct").engine is not None  # the server keeps serving


def test_too_big_for_the_budget_is_refused_before_loading(presets, monkeypatch):
    # served explicitly: left to itself the server would not serve what cannot fit (auto)
    manager = ModelManager(Settings(device="cpu", model_memory_budget_bytes=10 ** 6,
                                    served_models=("tiny-instruct",)))
    with pytest.raises(ModelLoadError, match="needs about") as info:
        manager.get("tiny-instruct")
    assert info.value.reason == "out_of_memory" and manager.loaded() == []


def test_missing_bitsandbytes_is_explained(manager, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ModelLoadError, match="bitsandbytes") as info:
        manager.get("instruct", "4bit")
    assert info.value.reason == "missing_dependency"


def test_not_a_falcon_mamba_checkpoint(tmp_path, presets):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((Path(presets["base"].source) / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        (Path(presets["base"].source) / "tokenizer_config.json").read_text())
    gpt = Preset("gpt", "a GPT-2", str(tmp_path), "base", TINY_PREC, "fp32")
    with pytest.raises(ModelLoadError) as info:
        ModelManager(Settings(device="cpu"), presets={"gpt": gpt}).get("gpt")
    assert info.value.reason == "incompatible" and "gpt2 model, not Falcon Mamba" in str(info.value)


def test_corrupt_weights_are_reported(tmp_path, presets):
    src = Path(presets["base"].source)
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    bad = Preset("bad", "broken tiny", str(tmp_path), "base", TINY_PREC, "fp32")
    with pytest.raises(ModelLoadError, match="broken tiny"):
        ModelManager(Settings(device="cpu"), presets={"bad": bad}).get("bad")


def test_tiny_loads_in_4bit_on_cpu(manager):
    pytest.importorskip("bitsandbytes")
    lm = manager.get("instruct", "4bit")
    state = lm.engine.new_state()
    logits = lm.engine.prefill(torch.tensor([[1, 5, 9, 12]]), state)
    assert torch.isfinite(logits).all() and lm.nbytes < manager.get("instruct").nbytes


def test_estimate_matches_the_published_7b():
    from kernels_check.models import config_7b

    cfg = config_7b()  # the published tiiuae/falcon-mamba-7b config, shipped with kernels_check
    assert abs(estimate_model_bytes(cfg, "bf16") / 2 - 7.27e9) < 0.05e9
    # NF4 mixers (~3.8 GB) plus embeddings and lm_head, which bitsandbytes leaves in bf16 (~1.07 GB)
    assert 4.6e9 < estimate_model_bytes(cfg, "4bit") < 5.1e9
    # on the CPU bitsandbytes computes in fp32, so embeddings and lm_head take 4 bytes a value
    assert estimate_model_bytes(cfg, "4bit", "cpu") - estimate_model_bytes(cfg, "4bit") > 1.0e9


def test_preload_and_gpu_calls(presets, monkeypatch):
    from fm_demo import zerogpu
    from fm_demo.engine import SamplingParams

    tiny = {k: presets[k] for k in ("instruct", "base")}
    plain = ModelManager(Settings(device="cpu"), presets=tiny)
    assert plain.gpu is None and all(lm.gpu is None for lm in plain.preload())
    assert [lm.key for lm in plain.loaded()] == [("instruct", "fp32"), ("base", "fp32")]

    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda env=None: True)
    monkeypatch.setattr(zerogpu, "gpu_task", lambda fn=None, *, duration=60: fn)  # in-process stand-in
    zero = ModelManager(Settings(device="cpu"), presets=tiny)
    lm = zero.preload(["instruct"])[0]
    assert lm.gpu is zero.gpu and zero.gpu is not None
    ids = torch.tensor([[3, 4, 5, 6]])
    state = lm.gpu.prefill(lm.key, lm.engine.new_state(), ids)
    ref = lm.engine.new_state()
    lm.engine.prefill(ids, ref)
    assert state.seqlen == 4 and torch.equal(state.ssm, ref.ssm) and torch.equal(state.conv, ref.conv)
    *events, update = lm.gpu.stream(lm.key, state, torch.tensor([[7]]), sampling=SamplingParams(), max_new_tokens=3)
    assert len(events) == 3 and isinstance(update, zerogpu.StateUpdate) and update.state.seqlen == 4 + 1 + 3
    with pytest.raises(ModelLoadError, match="not loaded in the GPU worker"):
        lm.gpu.prefill(("base", "fp32"), lm.engine.new_state(), ids)


# -- what clients may load -------------------------------------------------------------------
@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """The hub's download functions, recording every call and fetching nothing; hf_hub_download
    hands out the published 7B config.json (kernels_check) as a hub checkpoint's config."""
    import huggingface_hub
    from kernels_check.models import CONFIG_7B

    calls = []
    config = tmp_path / "config.json"
    config.write_text(CONFIG_7B.read_text())

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot", repo_id))
        raise AssertionError(f"downloaded the weights of {repo_id}")

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        return str(config)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_auto_serves_the_offered_presets_whose_smallest_precision_fits_without_downloading(no_hub):
    small = ModelManager(Settings(device="cpu", model_memory_budget_bytes=2 * 10 ** 9))
    assert small.served == ("tiny-base", "tiny-instruct")
    assert set(small.presets) == set(PRESETS)  # offered stays every preset
    big = ModelManager(Settings(device="cpu", model_memory_budget_bytes=10 ** 12))
    assert big.served == tuple(PRESETS)
    assert no_hub == []  # neither list looked anything up


def test_an_unserved_preset_is_refused_by_name_before_anything_loads(no_hub):
    manager = ModelManager(Settings(device="cpu", served_models=("tiny-instruct",)))
    assert manager.served == ("tiny-instruct",) and list(manager.served_presets) == ["tiny-instruct"]
    for key in ("tiny-base", "7b-instruct"):
        with pytest.raises(ModelLoadError, match="not served on this server; it serves tiny-instruct") as info:
            manager.get(key)
        assert info.value.reason == "not_served"
    assert manager.loaded() == [] and no_hub == []
    assert manager.get("tiny-instruct").key == ("tiny-instruct", "fp32")


def test_served_models_must_be_offered():
    from fm_demo.settings import SettingsError

    with pytest.raises(SettingsError, match="served_models: '7b-base' is not an offered preset"):
        Settings(device="cpu", offered_presets=("tiny-base", "tiny-instruct"), served_models=("7b-base",))
    with pytest.raises(SettingsError, match="FM_DEMO_SERVED_MODELS"):
        Settings.from_env({"FM_DEMO_SERVED_MODELS": "tiny-base,gpt-5"})
    assert Settings.from_env({"FM_DEMO_SERVED_MODELS": "tiny-base, tiny-instruct"}).served_models == (
        "tiny-base", "tiny-instruct")


def test_a_hub_model_too_big_for_the_budget_is_refused_from_its_config_alone(no_hub):
    manager = ModelManager(Settings(device="cpu", served_models=("7b-instruct",),
                                    model_memory_budget_bytes=10 ** 9))
    with pytest.raises(ModelLoadError, match="needs about") as info:
        manager.get("7b-instruct", "fp32")
    assert info.value.reason == "out_of_memory"
    assert no_hub == [("file", "tiiuae/falcon-mamba-7b-instruct", "config.json")]  # never the weights


def _hold_a_row(lm):
    """A reply that runs until closed (no stop token, a long budget), started."""
    from fm_demo.serving import Request

    reply = lm.runner.submit(Request([1, 2, 3], max_new_tokens=10 ** 6))
    next(reply.tokens())
    return reply


def test_a_model_in_use_is_never_unloaded_to_make_room(presets):
    one = ModelManager(Settings(device="cpu"), presets=presets).get("instruct").nbytes
    tight = ModelManager(Settings(device="cpu", model_memory_budget_bytes=int(1.5 * one)), presets=presets)
    busy = tight.get("instruct")
    reply = _hold_a_row(busy)
    try:
        with pytest.raises(ModelLoadError, match="busy") as info:
            tight.get("base")
        assert info.value.reason == "busy" and "tiny instruct" in str(info.value)
        assert tight.loaded() == [busy] and busy.runner.in_use() == 1
        assert len([next(reply.tokens()) for _ in range(5)]) == 5  # its user is still being answered
    finally:
        reply.close()
    assert busy.runner.in_use() == 0
    base = tight.get("base")  # now idle: it makes room
    assert tight.loaded() == [base] and not tight.is_loaded(busy)


def test_close_if_idle_counts_waiting_requests_and_refuses_while_any_is_there():
    from fm_demo.engine import Engine, tiny_model
    from fm_demo.serving import Request, Scheduler, SchedulerClosed

    sched = Scheduler(Engine(tiny_model(seed=1, hidden_size=32, num_hidden_layers=1)), max_batch=1,
                      max_waiting=2, start=False)  # no thread: requests stay waiting
    reply = sched.submit(Request([1, 2, 3], max_new_tokens=2))
    assert sched.in_use() == 1 and sched.close_if_idle() is False
    sched.submit(Request([4], max_new_tokens=1)).close()  # a cancelled one leaves no trace
    assert sched.in_use() == 1
    reply.close()
    assert sched.in_use() == 0 and sched.close_if_idle() is True
    with pytest.raises(SchedulerClosed):
        sched.submit(Request([1], max_new_tokens=1))


def test_loaded_models_share_one_prefix_cache_budget_and_an_unloaded_one_gives_its_share_back(presets):
    manager = ModelManager(Settings(device="cpu"), presets=presets)
    a, b = manager.get("instruct"), manager.get("base")
    one = a.engine.state_nbytes()
    manager.cache_pool.budget_bytes = 3 * one
    for lm, first in ((a, 10), (b, 20), (a, 30), (b, 40)):  # four states, room for three in all
        ids = torch.tensor([[first, first + 1]])
        state = lm.engine.new_state()
        lm.engine.prefill(ids, state)
        lm.prefix_cache.insert(ids[0].tolist(), state, "s")
    assert a.prefix_cache.nbytes + b.prefix_cache.nbytes == 3 * one == manager.cache_pool.nbytes
    assert a.prefix_cache.find([10, 11], "s") == (0, None)  # the oldest went, from the other model's cache
    manager.unload(a.key)
    assert manager.cache_pool.members == [b.prefix_cache] and manager.cache_pool.nbytes == 2 * one
