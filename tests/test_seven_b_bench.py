"""bench/seven_b.py --quick: the 7B bench's own code at 2 layers, run as a deployer runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"load_s", "rss_bytes", "estimate_bytes", "state_values", "decode_tok_s", "bandwidth_bound_tok_s",
        "ttft_turn1_s", "ttft_turn10_s"}


def test_quick_run_reports_every_figure():
    run = subprocess.run([sys.executable, "bench/seven_b.py", "--quick", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert set(out) == KEYS and set(out["decode_tok_s"]) == {"1", "4"}
    assert out["state_values"] == 2 * 8192 * (16 + 3)
    assert out["estimate_bytes"] == 1_486_610_432  # 2 layers of the 7B and its embeddings, in bf16
    assert 0.75 < out["estimate_bytes"] / out["rss_bytes"] < 1.25  # resident bytes move with the allocator
    assert all(v > 0 for v in (out["load_s"], out["bandwidth_bound_tok_s"], out["ttft_turn1_s"],
                               out["ttft_turn10_s"], *out["decode_tok_s"].values()))
