"""lm-evaluation-harness, written by others, scores a multiple-choice task through the server's
/v1/completions (its `local-completions` model: token-id prompts, echo, logprobs) on a local task
file, with no downloads. Its accuracy must equal the one computed here from the engine's own
log-probabilities of each choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_openai_api import context, serve
from tiny_fixtures import bundled_checkpoint

from fm_demo.settings import Settings

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test dependency (requirements-dev.txt)")

DOCS = [
    {"question": "What is 2 plus 3?", "choices": ["5", "7", "9"], "answer": 0},
    {"question": "What is the capital of France?", "choices": ["Rome", "Paris", "Berlin"], "answer": 1},
    {"question": "Which is larger, 12 or 30?", "choices": ["12", "30"], "answer": 1},
    {"question": "Spell the word cat backwards.", "choices": ["tac", "act", "cta"], "answer": 0},
    {"question": "What is 10 minus 4?", "choices": ["14", "6", "4"], "answer": 1},
    {"question": "What is the capital of Italy?", "choices": ["Madrid", "Lisbon", "Rome"], "answer": 2},
    {"question": "What color is the sky on a clear day?", "choices": ["green", "blue"], "answer": 1},
    {"question": "What is 7 plus 8?", "choices": ["15", "13", "18"], "answer": 0},
]
TASK = """
task: fm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def direct_accuracy(lm) -> float:
    """Accuracy from the engine alone: each choice's summed log-probability given the question,
    tokenised as the harness does (context and context + " " + choice, the choice's tokens the
    difference), read afresh."""
    tok, engine = lm.tokenizer, lm.engine
    right = 0
    for doc in DOCS:
        context_text = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context_text, add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tok(context_text + " " + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            logits = engine.prefill(torch.tensor([ctx + cont]), engine.new_state(), all_logits=True)[0]
            lp = torch.log_softmax(logits.float(), -1)
            scores.append(sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(DOCS)


def test_lm_eval_local_completions_matches_the_engines_own_scores(tmp_path):
    settings = Settings(device="cpu", max_new_tokens=8)
    ctx = context(settings)
    demo, url = serve(settings, ctx)
    try:
        data = tmp_path / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        (tasks / "fm_local_mc.yaml").write_text(textwrap.dedent(TASK.format(data=data)))
        out = tmp_path / "results"
        args = [f"base_url={url}/v1/completions", "model=tiny-base", f"tokenizer={bundled_checkpoint('base')}",
                "tokenizer_backend=huggingface", "num_concurrent=1", "max_retries=1", "timeout=120"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                               ",".join(args), "--tasks", "fm_local_mc", "--include_path", str(tasks),
                               "--output_path", str(out), "--batch_size", "1"],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
        assert results, proc.stdout[-2000:]
        acc = results[0]["results"]["fm_local_mc"]["acc,none"]
        assert acc == pytest.approx(direct_accuracy(ctx.manager.get("tiny-base")), abs=1e-9)
    finally:
        demo.close()
