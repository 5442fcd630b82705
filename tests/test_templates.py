"""Prompts rendered by the checkpoint's own chat template: a local checkpoint whose tokenizer writes
Falcon3-style roles and whose generation config names its own pair of stop tokens, served through
the chat tab and /v1/chat/completions; and a template that rewrites earlier turns.

Both reuse the bundled tiny instruct weights (trained on the <|im_start|> format: its replies under
these roles are whatever they are; the tests check the tokens around them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tiny_fixtures import bundled_checkpoint

from fm_demo import chat, templates
from fm_demo.conversations.store import SessionStore
from fm_demo.models import ModelManager
from fm_demo.settings import Settings, extra_preset
from fm_demo.ui import chat_tab
from fm_demo.ui.common import AppContext
from fm_demo.ui.inputs import Sampling
from fm_demo.ui.openai_api import api_routes
from fm_demo.ui.readout import readout_html

N = 8  # new tokens per reply
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Falcon3-Mamba-7B-Instruct's shape of template: role tags on their own line, eos_token after a reply
FALCON3_STYLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Past replies (all but a final assistant message) rendered without their text, as templates that
# drop the reasoning of earlier replies do: the rendering of a turn changes once another follows.
REWRITING = FALCON3_STYLE.replace(
    "m['content'] + eos_token", "(m['content'] if loop.last else '(earlier reply)') + eos_token")
SYSTEM = "Be brief."


def template_checkpoint(tmp_path_factory, name: str, template: str) -> tuple[str, list[int]]:
    """A local checkpoint: the tiny instruct weights, its tokenizer with ROLES added, `template` in
    tokenizer_config.json and <|end|> as eos; its generation config stops at <|end|> and
    <|im_end|> (the tiny model's own end of turn). Returns the folder and that eos pair."""
    from transformers import AutoTokenizer, GenerationConfig

    src, out = Path(bundled_checkpoint("instruct")), tmp_path_factory.mktemp(name) / name
    out.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, out / f)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(ROLES, special_tokens=True)
    tok.eos_token, tok.chat_template = "<|end|>", template
    tok.save_pretrained(out, save_jinja_files=False)
    eos = tok.convert_tokens_to_ids(["<|end|>", "<|im_end|>"])
    gen = GenerationConfig.from_pretrained(src)
    gen.eos_token_id = eos
    gen.save_pretrained(out)
    return str(out), eos


def app_context(path: str) -> tuple[AppContext, str]:
    """The app's context with the checkpoint as a server-configured model (FM_DEMO_EXTRA_MODELS)."""
    settings = Settings(device="cpu", max_new_tokens=N)
    preset = extra_preset(f"{path}:instruct")
    manager = ModelManager(settings, presets={preset.key: preset})
    return AppContext(settings, manager, SessionStore(settings, manager)), preset.key


def recorded(ctx: AppContext, key: str) -> list:
    """The requests the model's runner is given, from now on."""
    lm, seen = ctx.manager.get(key, "fp32"), []
    submit = lm.runner.submit
    lm.runner.submit = lambda req: (seen.append(req), submit(req))[1]
    return seen


def knobs(key: str) -> chat_tab.Knobs:
    return chat_tab.Knobs(key, "fp32", SYSTEM, Sampling(temperature=0.0, top_p=1.0, top_k=0,
                                                        repetition_penalty=1.0, max_new_tokens=N, seed=0))


def rendered(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False))


@pytest.fixture(scope="module")
def falcon3(tmp_path_factory):
    path, eos = template_checkpoint(tmp_path_factory, "falcon3-style-tiny", FALCON3_STYLE)
    ctx, key = app_context(path)
    return ctx, key, eos


@pytest.fixture(scope="module")
def rewriting(tmp_path_factory):
    path, _ = template_checkpoint(tmp_path_factory, "rewriting-tiny", REWRITING)
    ctx, key = app_context(path)
    return ctx, key


def test_the_chat_tab_reads_the_templates_prompt_and_then_only_each_new_turn(falcon3):
    ctx, key, eos = falcon3
    lm, seen = ctx.manager.get(key, "fp32"), recorded(*falcon3[:2])
    tok, request = lm.tokenizer, gr.Request(session_hash="falcon3")
    assert lm.prefix_stable is True and "chat template: prefix-stable" in "; ".join(lm.notes)
    list(chat_tab.send(ctx, "What is 2 plus 3?", knobs(key), [], request=request))
    conv = ctx.store.get("falcon3", "chat")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 plus 3?"}]
    first = seen[-1]
    assert list(first.tokens) == rendered(tok, messages)  # exactly the template's prompt
    assert tok.decode(first.tokens).endswith("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n")
    assert {*eos, tok.eos_token_id} <= set(first.stop_token_ids)  # the generation config's pair stops
    history = conv.context_tokens

    list(chat_tab.send(ctx, "And 3 plus 3?", knobs(key), [], request=request))
    second, m = seen[-1], conv.last_metrics
    new = conv.turns[-1].prompt_ids
    assert list(second.tokens) == list(first.tokens) + conv.turns[0].reply_ids + new
    assert m.reused_tokens == history and m.prefilled_tokens == len(new) and m.rebuilt_tokens == 0
    # the new tokens are what the template writes after the reply: its closing (unless the model
    # wrote <|end|> itself), the next user message and the generation prompt
    messages += [{"role": "assistant", "content": conv.turns[0].reply},
                 {"role": "user", "content": "And 3 plus 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(tok.decode(new)) and tok.decode(new).endswith("<|user|>\nAnd 3 plus 3?\n<|assistant|>\n")
    if conv.turns[0].reply_ids[-1:] == [eos[0]]:  # the model closed its reply as the template does
        assert list(second.tokens) == rendered(tok, messages)


def test_v1_chat_completions_renders_messages_with_the_same_template(falcon3):
    ctx, key, eos = falcon3
    lm, seen = ctx.manager.get(key, "fp32"), recorded(*falcon3[:2])
    app = FastAPI(routes=api_routes())
    app.get_blocks = lambda: SimpleNamespace(fm_context=ctx)  # the routes find the context through the app
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Spell cat."},
                {"role": "assistant", "content": "tac"}, {"role": "user", "content": "Spell dog."}]
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": key, "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    req, tok = seen[-1], lm.tokenizer
    ids = rendered(tok, messages)
    assert list(req.tokens) == ids and r.json()["usage"]["prompt_tokens"] == len(ids)
    assert {*eos, tok.eos_token_id} <= set(req.stop_token_ids)
    # a state at each message's end: where the messages up to it, rendered alone, end
    ends = [len(rendered(tok, messages[:i + 1], add_generation_prompt=False)) for i in range(len(messages))]
    assert set(req.keep_at) == {e for e in ends if e < len(ids)} and len(req.keep_at) == len(messages)
    assert chat.encode_messages(lm.chat_format, tok, messages) == (ids, tuple(sorted(req.keep_at)))


def test_a_template_that_rewrites_earlier_turns_rereads_from_the_change_and_says_so(rewriting):
    ctx, key = rewriting
    lm, seen = ctx.manager.get(key, "fp32"), recorded(*rewriting)
    tok, request = lm.tokenizer, gr.Request(session_hash="rewrite")
    assert lm.prefix_stable is False and "rewrites earlier turns" in "; ".join(lm.notes)
    list(chat_tab.send(ctx, "What is 2 plus 3?", knobs(key), [], request=request))
    conv = ctx.store.get("rewrite", "chat")
    first_prompt, first_reply = list(seen[-1].tokens), list(conv.turns[0].reply_ids)
    outs = list(chat_tab.send(ctx, "And 3 plus 3?", knobs(key), [], request=request))
    m, second = conv.last_metrics, seen[-1]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": conv.turns[0].reply}, {"role": "user", "content": "And 3 plus 3?"}]
    assert list(second.tokens) == rendered(tok, messages)  # the whole rendering, rewritten turn included
    assert "(earlier reply)" in tok.decode(second.tokens)
    # the reply's text changed: the nearest state is the one before its first token
    assert second.tokens[:len(first_prompt)] == first_prompt and conv.turns[0].reply_ids != first_reply
    history = len(second.tokens) - len(conv.turns[-1].prompt_ids)
    assert m.reused_tokens == len(first_prompt) - 1
    assert m.rebuilt_tokens == history - m.reused_tokens and m.rebuilt_reason == templates.REWRITE_REASON
    assert m.prefilled_tokens == len(second.tokens) - m.reused_tokens
    html = outs[-1][2]
    assert f"{m.rebuilt_tokens:,} re-read: the chat template rewrote earlier turns" in html
    assert html == readout_html(m)

    list(chat_tab.send(ctx, "Thanks!", knobs(key), [], request=request))
    m, done = conv.last_metrics, conv.turns[0]
    assert m.reused_tokens >= len(done.prompt_ids) + len(done.reply_ids)  # rewritten once, read once


@pytest.mark.parametrize("closed", [True, False])
def test_the_tiny_instruct_template_gives_the_hand_written_formats_tokens(closed):
    """The bundled instruct checkpoint's template writes chat.INSTRUCT's format: turn by turn, its
    prompts are the same tokens, whether a reply ended with the model's <|im_end|> or not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_checkpoint("instruct"))
    fmt = chat.format_for("instruct", tok, [2, 0])
    assert fmt.template and chat.stop_token_ids(fmt, tok) == {0, 2}
    assert templates.check(tok, {0, 2}).prefix_stable
    turns, prev = [], None
    for user, reply in [("Hello!", "Hi, how can I help?"), ("What is 2+3?", "5"), ("Thanks.", "")]:
        ext = chat.next_prompt(fmt, tok, turns, user, system=SYSTEM)
        assert ext.layout is None and ext.prompt == chat.prompt_ids(chat.INSTRUCT, tok, user, prev, system=SYSTEM)
        prev = chat.encode(tok, reply) + (chat.encode(tok, "<|im_end|>") if closed else [])
        turns.append(SimpleNamespace(user=user, reply=reply, prompt_ids=ext.prompt, reply_ids=prev))


@pytest.mark.parametrize("variant", ["base", "instruct"])
def test_the_tiny_checkpoints_keep_their_template_in_the_tokenizer_config_training_writes(tmp_path, variant):
    from fm_demo.tiny.tokenizer import CHAT_TEMPLATE, load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(), tmp_path, variant)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["chat_template"] == CHAT_TEMPLATE and not (tmp_path / "chat_template.jinja").exists()
    bundled = Path(bundled_checkpoint(variant)) / "tokenizer_config.json"
    assert json.loads(bundled.read_text()) == written


def test_a_reply_the_tokenizer_would_cut_otherwise_or_with_hidden_tokens_stays_as_generated():
    """The state holds the tokens the model generated: a reply written in other pieces than its
    text encodes to, or with a special token that never shows, stays; the next prompt is only
    what the template writes after the reply's text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_checkpoint("instruct"))
    fmt = chat.format_for("instruct", tok, [2, 0])
    first = chat.next_prompt(fmt, tok, [], "Spell cat.", system=SYSTEM).prompt
    pieces = [i for c in "t a c" for i in chat.encode(tok, c)]  # one token per character
    reply = pieces[:2] + chat.encode(tok, "<|im_start|>") + pieces[2:]  # a hidden special token
    assert pieces != chat.encode(tok, "t a c")
    turns = [SimpleNamespace(user="Spell cat.", reply="t a c", prompt_ids=first, reply_ids=reply)]
    ext = chat.next_prompt(fmt, tok, turns, "Spell dog.", system=SYSTEM)
    assert ext.layout is None
    assert tok.decode(ext.prompt) == "<|im_end|>\n<|im_start|>user\nSpell dog.<|im_end|>\n<|im_start|>assistant\n"
