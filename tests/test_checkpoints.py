"""Local checkpoint directories in FM_DEMO_EXTRA_MODELS: served like any preset, checked at start-up.

The checkpoint is what a fine-tune leaves behind: a small random-weight FalconMambaConfig saved
with save_pretrained, and the tokenizer of a bundled checkpoint saved next to it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_fixtures import bundled_checkpoint

from fm_demo.conversations.sessions import Conversation
from fm_demo.engine import SamplingParams
from fm_demo.models import ModelLoadError, ModelManager
from fm_demo.settings import Settings, SettingsError

N = 8  # reply tokens: enough to compare with transformers' own greedy decoding
NAME = "my-falcon-ft"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, FalconMambaConfig, FalconMambaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled_checkpoint("instruct"))
    out = tmp_path_factory.mktemp("runs") / NAME
    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, state_size=8,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    FalconMambaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def env(spec: str, **more: str) -> dict[str, str]:
    return {"FM_DEMO_DEVICE": "cpu", "FM_DEMO_EXTRA_MODELS": spec, **more}


def test_a_local_checkpoint_is_loaded_and_chatted_with(finetuned):
    settings = Settings.from_env(env(f"{finetuned}:instruct", FM_DEMO_DEFAULT_PRESET=NAME,
                                     FM_DEMO_COMPARE_PRESETS=f"tiny-base,{NAME}"))
    preset = settings.preset(NAME)
    assert (preset.source, preset.kind, preset.local) == (str(finetuned), "instruct", True)
    assert preset.label == f"{NAME} (instruct, local checkpoint)"
    lm = ModelManager(settings).get(NAME)
    assert lm.precision == "fp32" and lm.model.config.num_hidden_layers == 2
    assert lm.tokenizer.eos_token == "<|im_end|>"

    conv = Conversation(lm, settings)
    *_, last = conv.send("Hello! Who are you?", SamplingParams(), max_new_tokens=N)
    turn = conv.turns[0]
    assert last.done and turn.reply_ids and last.text == turn.reply

    # The reply is the checkpoint's own: transformers' greedy decoding of the same prompt, from the
    # directory loaded afresh, gives the same tokens.
    from transformers import FalconMambaForCausalLM

    ref = FalconMambaForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    prompt = torch.tensor([turn.prompt_ids])
    with torch.no_grad():
        out = ref.generate(prompt, max_new_tokens=len(turn.reply_ids), do_sample=False,
                           attention_mask=torch.ones_like(prompt))
    assert out[0, prompt.shape[1]:].tolist() == turn.reply_ids


def test_paths_and_file_urls_name_the_same_directory(finetuned, monkeypatch):
    monkeypatch.chdir(finetuned.parent.parent)
    rel = os.path.relpath(finetuned)  # runsN/my-falcon-ft: an existing directory, not a hub id
    for spec in (str(finetuned), f"./{rel}", rel, finetuned.as_uri(), f"{finetuned.as_uri()}:base"):
        preset = Settings.from_env(env(spec)).preset(NAME)
        assert (preset.key, preset.source, preset.kind) == (NAME, str(finetuned), "base"), spec
    assert Settings.from_env(env(f"./{rel}:instruct")).preset(NAME).kind == "instruct"


def test_the_browser_cannot_name_a_directory(finetuned):
    settings = Settings.from_env(env(str(finetuned)))
    with pytest.raises(SettingsError, match="unknown model preset"):
        settings.preset(str(finetuned))
    with pytest.raises(ModelLoadError) as info:
        ModelManager(settings).get(str(finetuned))
    assert info.value.reason == "unknown_model"


def _broken(finetuned: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the good checkpoint with one thing wrong."""
    bad = tmp_path / "broken-ft"
    shutil.copytree(finetuned, bad)
    if how == "no config":
        (bad / "config.json").unlink()
    elif how == "gpt2":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif how == "no weights":
        (bad / "model.safetensors").unlink()
    elif how == "no tokenizer":
        (bad / "tokenizer.json").unlink()
    return bad


@pytest.mark.parametrize("how, message", [
    ("no config", r"broken-ft has no config\.json, so it is not a transformers checkpoint"),
    ("gpt2", r"broken-ft holds a gpt2 model \(config\.json model_type\); only Falcon Mamba"),
    ("no weights", r"broken-ft has no weights \(model\.safetensors, "),
    ("no tokenizer", r"broken-ft has no tokenizer \(tokenizer\.json, tokenizer\.model, vocab\.json\)"),
])
def test_a_broken_checkpoint_is_refused_at_start_up(finetuned, tmp_path, how, message):
    bad = _broken(finetuned, tmp_path, how)
    with pytest.raises(SettingsError, match=f"^FM_DEMO_EXTRA_MODELS: '{bad}': .*{message}"):
        Settings.from_env(env(str(bad)))


def test_bad_paths_and_kinds_are_refused(finetuned, tmp_path):
    cases = [
        (str(tmp_path / "missing"), f"no checkpoint directory at {tmp_path / 'missing'}"),
        (str(finetuned / "config.json"), "config.json is a file, not a checkpoint directory"),
        (f"{finetuned}:chat", "kind must be base or instruct, got 'chat'"),
        (f"file://server{finetuned}", "names host 'server'; a local checkpoint is file:///absolute/path"),
        ("checkpoint-500", "neither a checkpoint directory nor a hub model id"),
    ]
    for spec, message in cases:
        with pytest.raises(SettingsError, match="FM_DEMO_EXTRA_MODELS") as info:
            Settings.from_env(env(spec))
        assert message in str(info.value), spec


def test_two_directories_of_one_name_are_refused(finetuned, tmp_path):
    twin = tmp_path / NAME
    shutil.copytree(finetuned, twin)
    with pytest.raises(SettingsError, match=f"'{NAME}' would name both {finetuned} and {twin}"):
        Settings.from_env(env(f"{finetuned},{twin}"))
    same = Settings.from_env(env(f"{finetuned},{finetuned.as_uri()}"))
    assert [k for k in same.presets() if k == NAME] == [NAME]
