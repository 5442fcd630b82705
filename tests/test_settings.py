"""Settings: one source of defaults, environment and CLI overrides, errors that name the variable."""

from __future__ import annotations

import argparse

import pytest

from fm_demo.settings import PRESETS, Settings, SettingsError, extra_preset, parse_bytes


def test_presets_table():
    assert set(PRESETS) == {"tiny-base", "tiny-instruct", "7b-base", "7b-instruct", "7b-base-4bit",
                            "7b-instruct-4bit", "falcon3-mamba-7b-base", "falcon3-mamba-7b-instruct"}
    assert PRESETS["7b-instruct"].source == "tiiuae/falcon-mamba-7b-instruct"
    assert PRESETS["7b-base-4bit"].source == "tiiuae/falcon-mamba-7b-4bit"
    assert PRESETS["7b-instruct-4bit"].prequantized and PRESETS["7b-instruct-4bit"].precisions == ("4bit",)
    assert PRESETS["tiny-instruct"].source.endswith("falcon-mamba-tiny-instruct")
    for p in PRESETS.values():
        assert p.kind in ("base", "instruct") and p.default_precision in p.precisions


def test_falcon3_presets_are_told_apart_from_the_2024_models():
    base, instruct = PRESETS["falcon3-mamba-7b-base"], PRESETS["falcon3-mamba-7b-instruct"]
    assert (base.source, base.kind) == ("tiiuae/Falcon3-Mamba-7B-Base", "base")
    assert (instruct.source, instruct.kind) == ("tiiuae/Falcon3-Mamba-7B-Instruct", "instruct")
    for p in (base, instruct):
        assert {"bf16", "4bit"} <= set(p.precisions) and p.default_precision == "bf16" and not p.prequantized
        assert "Falcon3" in p.label and "Dec 2024" in p.label
    labels = [p.label for p in PRESETS.values()]
    assert len(set(labels)) == len(labels)
    assert all("Falcon3" not in PRESETS[k].label and "2024" in PRESETS[k].label
               for k in ("7b-base", "7b-instruct", "7b-base-4bit", "7b-instruct-4bit"))
    s = Settings.from_env({"FM_DEMO_DEVICE": "cpu",
                           "FM_DEMO_COMPARE_PRESETS": "falcon3-mamba-7b-base,falcon3-mamba-7b-instruct",
                           "FM_DEMO_OFFERED_PRESETS": "falcon3-mamba-7b-instruct,falcon3-mamba-7b-base",
                           "FM_DEMO_DEFAULT_PRESET": "falcon3-mamba-7b-instruct"})
    assert list(s.presets()) == ["falcon3-mamba-7b-base", "falcon3-mamba-7b-instruct"]
    assert s.compare_presets == ("falcon3-mamba-7b-base", "falcon3-mamba-7b-instruct")
    assert s.precision_for("falcon3-mamba-7b-instruct") == "fp32"
    assert s.replace(precision="4bit").precision_for("falcon3-mamba-7b-base") == "4bit"


def test_cpu_defaults_are_tiny_and_fp32():
    s = Settings.from_env({"FM_DEMO_DEVICE": "cpu"})
    assert s.default_preset == "tiny-instruct" and s.compare_presets == ("tiny-base", "tiny-instruct")
    assert s.precision_for("tiny-instruct") == "fp32" and s.precision_for("7b-instruct") == "fp32"
    assert s.precision_for("7b-instruct-4bit") == "4bit"
    assert s.replace(precision="4bit").precision_for("7b-base") == "4bit"


def test_env_overrides_and_units():
    s = Settings.from_env({"FM_DEMO_DEVICE": "cpu", "FM_DEMO_CHUNK_SIZE": "64",
                           "FM_DEMO_SESSION_BUDGET_BYTES": "1.5GiB", "FM_DEMO_COMPARE_PRESETS": "tiny-instruct, 7b-base",
                           "FM_DEMO_EXTRA_MODELS": "org/model-instruct,org/other:base", "FM_DEMO_SESSION_TTL_S": "60"})
    assert s.chunk_size == 64 and s.session_budget_bytes == int(1.5 * 2 ** 30) and s.session_ttl_s == 60.0
    assert s.compare_presets == ("tiny-instruct", "7b-base")
    assert s.preset("org/model-instruct").kind == "instruct" and s.preset("org/other").kind == "base"
    assert parse_bytes("512MB") == 512_000_000 and parse_bytes("42") == 42


@pytest.mark.parametrize("env, var", [
    ({"FM_DEMO_CHUNK_SIZE": "abc"}, "FM_DEMO_CHUNK_SIZE"),
    ({"FM_DEMO_CHUNK_SIZE": "0"}, "FM_DEMO_CHUNK_SIZE"),
    ({"FM_DEMO_DEFAULT_PRESET": "gpt-9"}, "FM_DEMO_DEFAULT_PRESET"),
    ({"FM_DEMO_COMPARE_PRESETS": "tiny-base"}, "FM_DEMO_COMPARE_PRESETS"),
    ({"FM_DEMO_PRECISION": "int3"}, "FM_DEMO_PRECISION"),
    ({"FM_DEMO_SESSION_BUDGET_BYTES": "lots"}, "FM_DEMO_SESSION_BUDGET_BYTES"),
    ({"FM_DEMO_EXTRA_MODELS": "../etc/passwd"}, "FM_DEMO_EXTRA_MODELS"),
    ({"FM_DEMO_MAX_NEW_TOKENS": "5000"}, "FM_DEMO_MAX_NEW_TOKENS"),
    ({"FM_DEMO_CPU_THREADS": "-1"}, "FM_DEMO_CPU_THREADS"),
    ({"FM_DEMO_CPU_THREADS": "two"}, "FM_DEMO_CPU_THREADS"),
])
def test_env_errors_name_the_variable(env, var):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({"FM_DEMO_DEVICE": "cpu", **env})


def test_cpu_threads_auto_env_and_cli():
    s = Settings.from_env({"FM_DEMO_DEVICE": "cpu"})
    assert s.cpu_threads == 0 and s.torch_threads() == 1  # auto: one thread when serving on the CPU
    assert Settings.from_env({"FM_DEMO_DEVICE": "cpu", "FM_DEMO_CPU_THREADS": " 3 "}).torch_threads() == 3
    parser = Settings.add_cli_args(argparse.ArgumentParser())
    cli = Settings.from_cli(parser.parse_args(["--cpu-threads", "2"]), env={"FM_DEMO_DEVICE": "cpu"})
    assert cli.torch_threads() == 2
    with pytest.raises(SettingsError, match="--cpu-threads: must be >= 0"):
        Settings.from_cli(parser.parse_args(["--cpu-threads", "-4"]), env={"FM_DEMO_DEVICE": "cpu"})


def test_app_start_up_sets_torch_threads():
    """app.py applies the setting when it builds the app, not a library module at import."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import torch; import fm_demo.conversations.sessions, fm_demo.conversations.store, fm_demo.models; before = torch.get_num_threads(); "
             "import app; print(before, torch.get_num_threads())")
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "FM_DEMO_DEVICE": "cpu", "FM_DEMO_CPU_THREADS": "3", "OMP_NUM_THREADS": "2",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["2", "3"], out.stderr[-2000:]


def test_cli_overrides_env_and_names_flags():
    parser = Settings.add_cli_args(argparse.ArgumentParser())
    s = Settings.from_cli(parser.parse_args(["--chunk-size", "32", "--port", "8000"]),
                          env={"FM_DEMO_DEVICE": "cpu", "FM_DEMO_CHUNK_SIZE": "64", "FM_DEMO_MAX_SESSIONS": "3"})
    assert (s.chunk_size, s.port, s.max_sessions) == (32, 8000, 3)
    with pytest.raises(SettingsError, match="--max-new-tokens"):
        Settings.from_cli(parser.parse_args(["--max-new-tokens", "-1"]), env={"FM_DEMO_DEVICE": "cpu"})


def test_help_lists_every_setting():
    text = " ".join(Settings.add_cli_args(argparse.ArgumentParser()).format_help().split())  # unwrapped
    assert "--extra-models" in text and "90% of the device" in text and "--port" in text


def test_cuda_request_without_cuda_is_an_error():
    import torch

    if torch.cuda.is_available():
        assert Settings.from_env({"FM_DEMO_DEVICE": "cuda"}).default_preset == "7b-instruct"
    else:
        with pytest.raises(SettingsError, match="FM_DEMO_DEVICE"):
            Settings.from_env({"FM_DEMO_DEVICE": "cuda"})


def test_browser_cannot_name_arbitrary_models():
    s = Settings(device="cpu")
    with pytest.raises(SettingsError, match="unknown model preset"):
        s.preset("someone/any-model")
    with pytest.raises(SettingsError):
        extra_preset("not a repo id")
    assert s.clamp_new_tokens(10 ** 9) == s.max_new_tokens_cap and s.clamp_new_tokens(None) == s.max_new_tokens


def test_listen_address_is_gradios_unless_given():
    """FM_DEMO_HOST/PORT and --host/--port are passed to launch(); nothing else is (Gradio decides)."""
    from fm_demo.ui import server_kwargs

    space = {"FM_DEMO_DEVICE": "cpu", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    assert server_kwargs(Settings.from_env(space)) == {"server_name": None, "server_port": None}
    ours = {**space, "FM_DEMO_HOST": "127.0.0.1", "FM_DEMO_PORT": "8001"}
    assert server_kwargs(Settings.from_env(ours)) == {"server_name": "127.0.0.1", "server_port": 8001}
    parser = Settings.add_cli_args(argparse.ArgumentParser())
    cli = Settings.from_cli(parser.parse_args(["--port", "8002"]), env=ours)
    assert server_kwargs(cli) == {"server_name": "127.0.0.1", "server_port": 8002}
    for bad in ("-1", "65536"):
        with pytest.raises(SettingsError, match="FM_DEMO_PORT: must be 0"):
            Settings.from_env({**space, "FM_DEMO_PORT": bad})


LAUNCH_PROBE = """
import argparse, json, os, sys
import gradio as gr, psutil
from fm_demo.settings import Settings
from fm_demo.ui import server_kwargs

parser = Settings.add_cli_args(argparse.ArgumentParser())
seen = []
for env, flags in json.loads(sys.argv[1]):
    settings = Settings.from_cli(parser.parse_args(flags), env={**os.environ, **env})
    with gr.Blocks() as demo:
        gr.Markdown("probe")
    demo.launch(prevent_thread_lock=True, quiet=True, **server_kwargs(settings))
    listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN})
    seen.append([listening, demo.root_path])
    demo.close()
print(json.dumps(seen))
"""


def test_gradio_variables_apply_under_fm_demo_variables_and_flags():
    """Real launches in a process started with a Space's GRADIO_* variables (Gradio reads them at import)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    gradio_port, ours, flag = ports
    cases = [
        ({}, [], [["0.0.0.0", gradio_port]]),
        ({"FM_DEMO_PORT": str(ours)}, [], [["0.0.0.0", ours]]),
        ({"FM_DEMO_HOST": "127.0.0.1", "FM_DEMO_PORT": str(ours)}, [], [["127.0.0.1", ours]]),
        ({"FM_DEMO_HOST": "localhost", "FM_DEMO_PORT": str(ours)},
         ["--host", "127.0.0.1", "--port", str(flag)], [["127.0.0.1", flag]]),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FM_DEMO_", "GRADIO_", "PYTHONPATH"))}
    env.update(FM_DEMO_DEVICE="cpu", GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(gradio_port),
               GRADIO_ROOT_PATH="/fm", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    probe = json.dumps([[case_env, flags] for case_env, flags, _ in cases])
    out = subprocess.run([sys.executable, "-c", LAUNCH_PROBE, probe], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert [listening for listening, _ in seen] == [expected for *_, expected in cases]
    assert [root for _, root in seen] == ["/fm"] * len(cases)
