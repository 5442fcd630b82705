"""Falcon Mamba 7B's exact per-layer shapes run here: the published config with 2 of its 64 layers
(width 4096, inner 8192, dt rank 256, state 16, vocab 65,024), random weights saved as a local
checkpoint, loaded by the model manager in fp32, bf16 and 4-bit, and served through a
Conversation, the scheduler at batch 4 and /v1/chat/completions.

The bundled tiny tokenizer (1,527 ids) fits the 65,024-row vocabulary; lm_head's rows of the ids
it lacks, of its special tokens and of the config's eos are zeroed (kernels_check.models.
confine_head_), so greedy replies write only ids it can decode and always run their full length.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import torch
from test_e2e_api import free_port
from tiny_fixtures import bundled_checkpoint

from fm_demo.conversations.sessions import Conversation
from fm_demo.conversations.store import SessionStore
from fm_demo.engine import SamplingParams
from fm_demo.models import ModelManager, estimate_model_bytes
from fm_demo.serving import Request
from fm_demo.settings import Preset, Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs
from fm_demo.ui.common import AppContext

LAYERS, WIDTH, INNER, DT_RANK, STATE, VOCAB = 2, 4096, 8192, 256, 16, 65_024
CONV_VALUES = 3  # conv_kernel 4: the last 3 inputs of every channel
CONV_BYTES = {"fp32": 4, "bf16": 2, "4bit": 4}  # the conv state takes the compute dtype: fp32 for 4-bit on CPU
N = 6  # tokens per reply
MESSAGES = ["Tell me about falcons.", "And about the sea?"]


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in model.backbone.layers.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, dict[str, tuple[int, int]]]:
    """The checkpoint folder (bf16 safetensors, config, tokenizer) and its mixers' Linear shapes."""
    from transformers import AutoTokenizer

    from kernels_check.models import build_random_model, config_7b, confine_head_

    config = config_7b()  # the published tiiuae/falcon-mamba-7b config
    config.num_hidden_layers = LAYERS
    assert (config.hidden_size, config.intermediate_size, config.time_step_rank, config.state_size,
            config.vocab_size) == (WIDTH, INNER, DT_RANK, STATE, VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(bundled_checkpoint("instruct"))
    assert len(tokenizer) <= VOCAB  # every id the tokenizer writes is a row of the 7B's vocabulary
    model = build_random_model(config, "cpu", torch.bfloat16)
    confine_head_(model, len(tokenizer), [*tokenizer.all_special_ids, config.eos_token_id])
    out = tmp_path_factory.mktemp("seven-b-shape")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), linear_shapes(model)


@pytest.fixture(scope="module")
def server(checkpoint):
    """The app (UI and /v1) with one preset per precision of the checkpoint."""
    path = checkpoint[0]
    settings = Settings(device="cpu", max_batch=4, max_new_tokens=N)
    ours = {f"seven-b-{p}": Preset(f"seven-b-{p}", f"7B shape, {LAYERS} layers ({p})", path, "instruct", (p,), p)
            for p in CONV_BYTES}
    presets = {k: dataclasses.replace(p, source=bundled_checkpoint(p.kind)) if k.startswith("tiny-") else p
               for k, p in settings.presets().items()}
    manager = ModelManager(settings, presets={**presets, **ours})
    ctx = AppContext(settings, manager, SessionStore(settings, manager))
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **launch_kwargs(settings))
    yield url.rstrip("/"), ctx
    demo.close()


@pytest.fixture(scope="module", params=list(CONV_BYTES))
def loaded(request, server, checkpoint):
    """(precision, the model loaded by the manager, the server's url, its context); unloaded after."""
    precision = request.param
    if precision == "4bit":
        pytest.importorskip("bitsandbytes")
        # bitsandbytes' 4-bit CPU path needs in_features % 64 == 0 and out_features % 32 == 0
        unfit = {n: s for n, s in checkpoint[1].items() if s[0] % 64 or s[1] % 32}
        if unfit:
            pytest.skip(f"bitsandbytes cannot run these Linear layers in 4-bit on the CPU: {unfit}")
    url, ctx = server
    lm = ctx.manager.get(f"seven-b-{precision}")
    yield precision, lm, url, ctx
    ctx.manager.unload(lm.key)


def expected_state_bytes(precision: str) -> int:
    return LAYERS * INNER * (STATE * 4 + CONV_VALUES * CONV_BYTES[precision])


def test_the_mixers_fit_bitsandbytes_4bit_on_cpu(checkpoint):
    shapes = checkpoint[1]
    assert set(shapes.values()) == {(WIDTH, 2 * INNER), (INNER, DT_RANK + 2 * STATE), (DT_RANK, INNER),
                                    (INNER, WIDTH)}
    assert all(i % 64 == 0 and o % 32 == 0 for i, o in shapes.values())


def test_loads_in_the_precision_asked_and_the_estimate_holds(loaded):
    precision, lm, _, _ = loaded
    assert lm.precision == precision and lm.engine.config.num_hidden_layers == LAYERS
    assert lm.engine.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    footprint = lm.model.get_memory_footprint()
    assert lm.nbytes == footprint
    estimate = estimate_model_bytes(lm.model.config, precision, "cpu")
    assert abs(estimate / footprint - 1) < 0.10, (estimate, footprint)


def test_state_size_is_layers_times_channels_times_ssm_and_conv_values(loaded):
    precision, lm, _, _ = loaded
    want = expected_state_bytes(precision)
    assert lm.engine.state_nbytes() == want == lm.engine.new_state().nbytes
    assert lm.engine.new_state().conv.numel() + lm.engine.new_state().ssm.numel() == LAYERS * INNER * (STATE + 3)


def test_a_conversation_of_two_turns(loaded):
    precision, lm, _, ctx = loaded
    conv = Conversation(lm, ctx.settings)
    done = [list(conv.send(text, SamplingParams(), N))[-1] for text in MESSAGES]
    assert [d.finish_reason for d in done] == ["length", "length"]
    assert [len(t.reply_ids) for t in conv.turns] == [N, N]
    first, second = done[0].metrics, done[1].metrics
    assert first.state_bytes == second.state_bytes == expected_state_bytes(precision)
    # the second turn starts from the state the first left: only its own tokens are read
    assert second.cache_hit and second.reused_tokens == first.context_tokens
    assert second.prefilled_tokens == len(conv.turns[1].prompt_ids)


def test_four_requests_at_once_decode_as_each_alone(loaded):
    _, lm, _, _ = loaded
    prompts = [torch.randint(0, 1000, (12 + i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(4)]

    def request(i: int) -> Request:
        return Request(prompts[i], namespace=f"row-{i}", max_new_tokens=N, cache=False)

    together = [lm.runner.submit(request(i)) for i in range(4)]
    batched = [[ev for ev in reply.tokens()] for reply in together]
    assert max(evs[-1].metrics.batch_mean for evs in batched) > 3  # they shared the decode steps
    solo = [[ev.token_id for ev in lm.runner.submit(request(i)).tokens()] for i in range(4)]
    assert [[ev.token_id for ev in evs] for evs in batched] == solo
    assert all(len(s) == N for s in solo)


def test_openai_chat_completion_replies_as_the_conversation_does(loaded):
    precision, lm, url, ctx = loaded
    conv = Conversation(lm, ctx.settings)
    reply = list(conv.send(MESSAGES[0], SamplingParams(), N))[-1].text
    assert reply
    body = {"model": f"seven-b-{precision}", "messages": [{"role": "user", "content": MESSAGES[0]}],
            "max_tokens": N, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == N and out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["content"] == reply
