"""Spacefile validation, Space bundles, deploy against a local stand-in of the Hub API, ZeroGPU hooks.

No network: deploy runs huggingface_hub's real HfApi against `HubStandIn`, a small HTTP server on
127.0.0.1 that implements the endpoints those calls use and records every request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from deploy.manifest import REPO_ROOT, SpacefileError, load_spacefile, parse_spacefile
from deploy.space import BundleError, bundle, deploy, gradio_version, main, space_variables
from fm_demo import zerogpu

EXAMPLES = REPO_ROOT / "spaces" / "examples"
TOKEN = "hf_standinwritetoken0123456789abcdef"
SECRET = "hf_standinreadsecret0123456789abcdef"


# -- the stand-in Hub ----------------------------------------------------------------------------
class HubStandIn:
    """The Hub endpoints create_repo, upload_folder, variables/secrets, hardware and runtime call."""

    def __init__(self, token: str = TOKEN):
        self.token, self.requests, self.spaces = token, [], {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                stand_in.handle(self, "GET")

            def do_POST(self):
                stand_in.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def calls(self, route: str) -> list[dict]:
        return [r for r in self.requests if r["route"] == route]

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if "ndjson" in (h.headers.get("Content-Type") or ""):
            body = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        else:
            body = json.loads(raw) if raw else None
        route, space_id = self.route(method, url.path)
        self.requests.append({"route": route, "space": space_id, "body": body, "query": parse_qs(url.query),
                              "auth": h.headers.get("Authorization")})
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.reply(h, 401, {"error": "Invalid credentials"})
        if route is None:
            return self.reply(h, 404, {"error": f"stand-in has no {method} {url.path}"})
        self.reply(h, 200, getattr(self, route.replace("-", "_"))(space_id, body))

    @staticmethod
    def route(method: str, path: str) -> tuple[str | None, str | None]:
        if method == "POST" and path == "/api/repos/create":
            return "create", None
        if method == "POST" and path == "/api/validate-yaml":
            return "validate-yaml", None
        m = re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/(preupload|commit|tree)/main/?", path)
        if m:
            return m.group(2), m.group(1)
        m = re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/(variables|secrets|hardware|runtime)", path)
        if m and (m.group(2) == "runtime") == (method == "GET"):
            return m.group(2), m.group(1)
        return None, None

    def reply(self, h: BaseHTTPRequestHandler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def space(self, space_id: str) -> dict:
        return self.spaces.setdefault(space_id, {"files": {}, "variables": {}, "secrets": {},
                                                 "hardware": None, "sleep": None})

    def create(self, _, body):
        space_id = f"{body['organization']}/{body['name']}"
        self.space(space_id)["hardware"] = body.get("hardware")
        return {"url": f"{self.url}/spaces/{space_id}"}

    def validate_yaml(self, _, body):
        from huggingface_hub import RepoCard

        data = RepoCard(body["content"]).data.to_dict()  # raises (-> 500) on broken front matter
        return {"errors": [] if data.get("sdk") else [{"message": "sdk is required"}], "warnings": []}

    def preupload(self, space_id, body):
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                          for f in body["files"]]}

    def commit(self, space_id, body):
        files = self.space(space_id)["files"]
        for op in body[1:]:
            if op["key"] == "file":
                files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            elif op["key"] == "deletedFile":
                files.pop(op["value"]["path"])
        return {"commitUrl": f"{self.url}/spaces/{space_id}/commit/{'0' * 40}", "commitOid": "0" * 40,
                "pullRequestUrl": None}

    def tree(self, space_id, _):
        return [{"type": "file", "path": p, "size": len(b), "oid": "1" * 40}
                for p, b in self.space(space_id)["files"].items()]

    def variables(self, space_id, body):
        self.space(space_id)["variables"][body["key"]] = body["value"]
        return {k: {"value": v} for k, v in self.space(space_id)["variables"].items()}

    def secrets(self, space_id, body):
        self.space(space_id)["secrets"][body["key"]] = body["value"]
        return {}

    def hardware(self, space_id, body):
        self.space(space_id).update(hardware=body["flavor"], sleep=body.get("sleepTimeSeconds"))
        return self.runtime(space_id, None)

    def runtime(self, space_id, _):
        s = self.space(space_id)
        return {"stage": "BUILDING", "hardware": {"current": None, "requested": s["hardware"]},
                "gcTimeout": s["sleep"]}


@pytest.fixture
def hub():
    stand_in = HubStandIn()
    yield stand_in
    stand_in.close()


# -- Spacefile validation ------------------------------------------------------------------------
def _valid_raw() -> dict:
    import tomllib

    return tomllib.loads((EXAMPLES / "zerogpu.Spacefile").read_text())


@pytest.mark.parametrize("name", ["cpu", "a10g", "zerogpu"])
def test_examples_are_valid(name):
    sf = load_spacefile(EXAMPLES / f"{name}.Spacefile")
    assert sf.default_preset in sf.presets
    assert sf.on_gpu == (name != "cpu") and sf.zerogpu == (name == "zerogpu")
    assert sf.requirements == ("cpu" if name == "cpu" else "cuda")


def test_project_spacefile_is_valid():
    sf = load_spacefile(REPO_ROOT / "Spacefile")
    assert sf.secrets.keys() == {"HF_TOKEN"}


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["space"].update(hardware="a10"), r"space\.hardware: 'a10' is not a Space hardware flavor"),
    (lambda r: r["space"].pop("id"), r"space\.id: required"),
    (lambda r: r["space"].update(id="no-slash"), r"space\.id: 'no-slash' must be 'owner/name'"),
    (lambda r: r["space"].update(short_description="x" * 61), r"61 characters; the Hub allows at most 60"),
    (lambda r: r["space"].update(hardwre="cpu-basic"), r"space\.hardwre: unknown field"),
    (lambda r: r["space"].update(sleep_time=3600), r"zero-a10g is free hardware whose sleep time"),
    (lambda r: r["models"].update(presets=["7b-instruct", "13b"]), r"unknown preset '13b'"),
    (lambda r: r["models"].update(default="7b-base-4bit"), r"models\.default: '7b-base-4bit' is not among"),
    (lambda r: r["space"].update(hardware="cpu-basic"), r"'7b-instruct' cannot run on cpu-basic: .*a GPU"),
    (lambda r: r["space"].update(hardware="t4-small"), r"'7b-instruct' cannot run on t4-small: .*bfloat16"),
    (lambda r: r.update(requirements={"set": "rocm"}), r"requirements\.set: 'rocm' is not 'cpu' or 'cuda'"),
    (lambda r: r["variables"].update(FM_DEMO_MAX_NEW_TOKEN="9"), r"did you mean FM_DEMO_MAX_NEW_TOKENS\?"),
    (lambda r: r["variables"].update(FM_DEMO_MAX_NEW_TOKENS="lots"), r"FM_DEMO_MAX_NEW_TOKENS: expected int"),
    (lambda r: r["variables"].update(FM_DEMO_DEFAULT_PRESET="7b-base"), r"set by \[models\]; remove it"),
    (lambda r: r["variables"].update(FM_DEMO_COMPARE_PRESETS="tiny-base,7b-instruct"),
     r"'tiny-base' is not among models\.presets"),
    (lambda r: r["variables"].update(FM_DEMO_EXTRA_MODELS=str(REPO_ROOT / "fm_demo/tiny/checkpoints/"
                                                              "falcon-mamba-tiny-base")),
     r"falcon-mamba-tiny-base is a local checkpoint, which the Space does not get"),
    (lambda r: r["secrets"].update(HF_TOKEN=SECRET), r"secrets\.HF_TOKEN: looks like a secret value"),
    (lambda r: r.update(extras={}), r"extras: unknown table"),
    (lambda r: r["space"].update(python_version="3.11"), r"ZeroGPU runs Python 3\.10 or 3\.12, not 3\.11"),
])
def test_invalid_spacefiles_name_the_field_and_why(edit, expected):
    raw = _valid_raw()
    edit(raw)
    with pytest.raises(SpacefileError) as e:
        parse_spacefile(raw, "bad.Spacefile")
    assert re.search(expected, str(e.value)), str(e.value)
    assert str(e.value).startswith("bad.Spacefile: ")


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "Spacefile"
    path.write_text('[space]\nid = "x"\nhardware = "gpu"\n[models]\npresets = ["nope"]\n')
    with pytest.raises(SpacefileError) as e:
        load_spacefile(path)
    assert {"space.id", "space.hardware", "models.presets", "space.short_description"} <= {
        p.split(":")[0] for p in e.value.problems}
    path.write_text("[space\nid=")
    with pytest.raises(SpacefileError, match="not valid TOML"):
        load_spacefile(path)
    with pytest.raises(SpacefileError, match="file not found"):
        load_spacefile(tmp_path / "missing")


# -- bundles -------------------------------------------------------------------------------------
EXPECTED_HUB = {
    "cpu": [],
    "a10g": ["tiiuae/falcon-mamba-7b-instruct", "tiiuae/falcon-mamba-7b-instruct-4bit",
             "tiiuae/falcon-mamba-7b-4bit"],
    "zerogpu": ["tiiuae/falcon-mamba-7b-instruct", "tiiuae/falcon-mamba-7b"],
}


@pytest.mark.parametrize("name", ["cpu", "a10g", "zerogpu"])
def test_bundle_front_matter_parses_with_huggingface_hub(name, tmp_path):
    from huggingface_hub import RepoCard, metadata_load

    sf = load_spacefile(EXAMPLES / f"{name}.Spacefile")
    files = bundle(sf, tmp_path / "out")
    out = tmp_path / "out"
    meta = metadata_load(out / "README.md")
    card = RepoCard.load(out / "README.md", repo_type="space")
    assert card.data.to_dict() == meta
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio_version()
    assert meta["python_version"] == ("3.10" if name == "zerogpu" else "3.11")
    assert meta["short_description"] == sf.short_description and len(meta["short_description"]) <= 60
    flavors = {"cpu": "cpu-basic", "a10g": "a10g-small", "zerogpu": "zero-a10g"}
    assert meta["suggested_hardware"] == flavors[name]
    assert meta.get("models", []) == EXPECTED_HUB[name]
    assert meta.get("preload_from_hub", []) == [f"{r} *.json,*.safetensors" for r in EXPECTED_HUB[name]]

    assert "app.py" in files and "requirements.txt" in files
    assert not [f for f in files if f.startswith("tests/") or "__pycache__" in f or f.endswith(".pyc")]
    checkpoints = [f for f in files if "/checkpoints/" in f]
    if name == "cpu":
        assert any("tiny-instruct" in f for f in checkpoints) and any("tiny-base" in f for f in checkpoints)
    else:
        assert checkpoints == []
    reqs = (out / "requirements.txt").read_text()
    cuda_lines = [ln.strip() for ln in (REPO_ROOT / "requirements-cuda.txt").read_text().splitlines()
                  if ln.strip() and not ln.startswith(("#", "-r"))]
    assert all(ln in reqs for ln in cuda_lines) == (name != "cpu")
    assert sorted(str(p.relative_to(out).as_posix()) for p in out.rglob("*") if p.is_file()) == files


FALCON3_SPACEFILE = """
[space]
id = "your-name/falcon3-mamba-chat"
short_description = "Falcon3-Mamba 7B next to Falcon Mamba 7B"
hardware = "zerogpu"
python_version = "3.10"

[models]
presets = ["falcon3-mamba-7b-instruct", "falcon3-mamba-7b-base", "7b-instruct"]
default = "falcon3-mamba-7b-instruct"

[variables]
FM_DEMO_COMPARE_PRESETS = "falcon3-mamba-7b-base,falcon3-mamba-7b-instruct"

[bundle]
include = ["app.py", "fm_demo"]
"""


def test_a_spacefile_offering_the_falcon3_presets_validates_and_bundles(tmp_path):
    import tomllib
    from huggingface_hub import metadata_load

    path = tmp_path / "Spacefile"
    path.write_text(FALCON3_SPACEFILE)
    sf = load_spacefile(path)
    assert sf.presets == ("falcon3-mamba-7b-instruct", "falcon3-mamba-7b-base", "7b-instruct")
    variables = space_variables(sf)
    assert variables["FM_DEMO_OFFERED_PRESETS"] == ",".join(sf.presets)
    assert variables["FM_DEMO_COMPARE_PRESETS"] == "falcon3-mamba-7b-base,falcon3-mamba-7b-instruct"

    out = tmp_path / "space"  # the command a deployer runs
    made = subprocess.run([sys.executable, "-m", "deploy.space", "bundle", str(out), "--spacefile", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    repos = ["tiiuae/Falcon3-Mamba-7B-Instruct", "tiiuae/Falcon3-Mamba-7B-Base", "tiiuae/falcon-mamba-7b-instruct"]
    meta = metadata_load(out / "README.md")
    assert meta["models"] == repos and meta["suggested_hardware"] == "zero-a10g"
    assert meta["preload_from_hub"] == [f"{r} *.json,*.safetensors" for r in repos]
    readme = (out / "README.md").read_text()
    assert "Falcon3-Mamba 7B Instruct (Dec 2024)" in readme and "Falcon Mamba 7B Instruct (2024)" in readme
    assert not list(out.rglob("checkpoints/*"))  # no tiny preset offered: no checkpoint carried

    # The Space checks the offered presets against the hardware like any 7B preset's.
    raw = tomllib.loads(FALCON3_SPACEFILE)
    raw["space"]["hardware"] = "t4-small"
    with pytest.raises(SpacefileError, match=r"'falcon3-mamba-7b-instruct' cannot run on t4-small: .*bfloat16"):
        parse_spacefile(raw)


def test_bundle_refuses_a_non_empty_folder(tmp_path):
    sf = load_spacefile(EXAMPLES / "zerogpu.Spacefile")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an empty folder"):
        bundle(sf, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert main(["bundle", str(tmp_path), "--spacefile", str(EXAMPLES / "zerogpu.Spacefile")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRADIO_CLI = Path(sys.executable).with_name("gradio")  # the console script installed with gradio


@pytest.mark.parametrize("command", [[sys.executable, "app.py"], [str(GRADIO_CLI), "app.py"]],
                         ids=["python app.py", "gradio app.py (reload mode)"])
def test_cpu_bundle_app_listens_where_the_space_says_and_answers_chat(tmp_path, command):
    """The bundle's own app.py, started the way a Space starts it: GRADIO_SERVER_NAME/PORT set, no
    FM_DEMO_HOST/PORT. It must listen on 0.0.0.0 and that port (a Space cannot reach 127.0.0.1)."""
    out = tmp_path / "space"
    spacefile = EXAMPLES / "cpu.Spacefile"
    made = subprocess.run([sys.executable, "-m", "deploy.space", "bundle", str(out), "--spacefile",
                           str(spacefile)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FM_DEMO_", "PYTHONPATH", "GRADIO_"))}
    env.update(space_variables(load_spacefile(spacefile)), SYSTEM="spaces", SPACE_ID="me/fm-tiny",
               GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "app.log", "w")
    # A session of its own: reload mode's watcher leaves its app process behind when terminated.
    proc = subprocess.Popen(command, cwd=out, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listening = _wait_listening(proc, tmp_path / "app.log")
        assert listening == {("0.0.0.0", port)}, f"listens on {sorted(listening)}, not 0.0.0.0:{port}"
        client = _wait_for(f"http://127.0.0.1:{port}/", proc, tmp_path / "app.log")
        reply = client.predict("Hello there", api_name="/chat")
        stats = client.predict(api_name="/stats")
        # Any text counts: the bundled tiny models are small, the point is the Space's app serving them.
        assert isinstance(reply, str) and reply, f"no reply from /chat: {reply!r}"
        assert stats["turns"] == 1 and stats["last_reply"]["new_tokens"] >= 1, stats
        _check_openai_routes(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
    assert (out / "fm_demo").is_dir() and not (out / "tests").exists()


def _check_openai_routes(url: str) -> None:
    """The OpenAI-compatible routes are served by the same server, however the app was started."""
    import httpx

    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in models} == {"tiny-instruct", "tiny-base"}, models
    body = {"model": "tiny-instruct", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] >= 1, reply


def _wait_listening(proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> set[tuple[str, int]]:
    """The TCP addresses the app (or a process it started) listens on, once it listens at all."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the bundled app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        found = set()
        try:
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # a child came or went while we looked; look again
            found = set()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"the bundled app did not listen within {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0):
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the bundled app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return Client(url, verbose=False)
        except Exception:
            time.sleep(0.5)
    pytest.fail(f"the bundled app did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


# -- deploy --------------------------------------------------------------------------------------
def test_deploy_calls_the_hub_with_the_expected_arguments(hub, capsys):
    from huggingface_hub import HfApi

    sf = load_spacefile(EXAMPLES / "a10g.Spacefile")
    runtime = deploy(sf, api=HfApi(endpoint=hub.url, token=TOKEN), space_id="me/fm-test",
                     env={"SPACE_SECRET_HF_TOKEN": SECRET})
    assert runtime.stage == "BUILDING" and runtime.requested_hardware == "a10g-small"

    create = hub.calls("create")[0]["body"]
    assert (create["organization"], create["name"], create["type"], create["sdk"]) == (
        "me", "fm-test", "space", "gradio")
    assert create["hardware"] == "a10g-small" and create["sleepTimeSeconds"] == 3600
    assert [c["body"] for c in hub.calls("hardware")] == [{"flavor": "a10g-small", "sleepTimeSeconds": 3600}]
    space = hub.spaces["me/fm-test"]
    assert space["variables"] == space_variables(sf)
    assert space["variables"]["FM_DEMO_DEFAULT_PRESET"] == "7b-instruct"
    assert space["variables"]["SPACE_HARDWARE"] == "a10g-small"
    assert [c["body"]["key"] for c in hub.calls("secrets")] == ["HF_TOKEN"]
    assert space["secrets"] == {"HF_TOKEN": SECRET}
    assert {"README.md", "requirements.txt", "app.py"} <= set(space["files"])
    assert not [f for f in space["files"] if "/checkpoints/" in f or f.startswith("tests/")]
    assert b"sdk: gradio" in space["files"]["README.md"]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    order = [r["route"] for r in hub.requests]
    assert order.index("hardware") < order.index("variables") < order.index("commit") < order.index("runtime")
    printed = capsys.readouterr().out
    assert SECRET not in printed and TOKEN not in printed
    assert "stage BUILDING" in printed


def test_redeploy_removes_files_the_bundle_no_longer_has(hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    hub.space("me/fm-test")["files"]["old_module.py"] = b"stale"
    deploy(load_spacefile(EXAMPLES / "zerogpu.Spacefile"), api=api, space_id="me/fm-test", env={},
           say=lambda _: None)
    files = hub.spaces["me/fm-test"]["files"]
    assert "old_module.py" not in files and "app.py" in files
    assert hub.calls("secrets") == []  # no SPACE_SECRET_HF_TOKEN here: the Space keeps its own


def test_deploy_cli_and_dry_run(hub, tmp_path):
    spacefile = str(EXAMPLES / "zerogpu.Spacefile")
    env = {**os.environ, "SPACE_SECRET_HF_TOKEN": SECRET, "HF_HUB_DISABLE_TELEMETRY": "1"}
    dry = subprocess.run([sys.executable, "-m", "deploy.space", "deploy", "--dry-run",
                          "--spacefile", spacefile],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "would call create_repo(repo_id='your-name/falcon-mamba-zero', repo_type='space'" in dry.stdout
    assert "would call add_space_secret(" in dry.stdout and "value='***'" in dry.stdout
    assert SECRET not in dry.stdout and hub.requests == []

    real = subprocess.run([sys.executable, "-m", "deploy.space", "deploy", "--spacefile", spacefile,
                           "--space-id", "me/zero", "--endpoint", hub.url, "--token", TOKEN],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0, real.stderr
    assert hub.spaces["me/zero"]["hardware"] == "zero-a10g"
    assert "Space me/zero: stage BUILDING" in real.stdout
    assert SECRET not in real.stdout + real.stderr and TOKEN not in real.stdout + real.stderr


def test_deploy_reports_hub_errors_clearly(hub):
    from huggingface_hub import HfApi

    sf = load_spacefile(EXAMPLES / "cpu.Spacefile")
    with pytest.raises(RuntimeError, match=r"create_repo failed for me/x: .*401"):
        deploy(sf, api=HfApi(endpoint=hub.url, token="hf_wrong"), space_id="me/x", env={}, say=lambda _: None)


# -- ZeroGPU hooks -------------------------------------------------------------------------------
def test_gpu_task_is_identity_off_zerogpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def f(x):
        return x

    assert zerogpu.gpu_task(f) is f and zerogpu.gpu_task(duration=30)(f) is f
    assert not zerogpu.on_zerogpu({}) and zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "true"})


def test_queue_options_are_explicit():
    assert zerogpu.queue_options(64, 4) == {"max_size": 64, "default_concurrency_limit": 4}
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        zerogpu.queue_options(0, 1)


def test_estimate_duration_is_bounded():
    assert 10 <= zerogpu.estimate_duration(10, 16) < 60 <= zerogpu.estimate_duration(100, 1024)
    assert zerogpu.estimate_duration(10**7, 10**6) == zerogpu.MAX_DURATION_S


def _tiny_engine():
    from fm_demo.engine import Engine, tiny_model

    return Engine(tiny_model(seed=3), chunk_size=4)


def _run_gpu_stream_in_fork(conn, engine, state, ids):
    """What a ZeroGPU worker does: a forked process (the engine comes with the fork), results pickled."""
    torch.set_num_threads(1)  # OpenMP's pool from the parent does not survive fork
    stream = zerogpu.make_gpu_stream(lambda key: (engine, None))
    conn.send(list(stream("tiny", state, ids, max_new_tokens=5)))
    conn.recv()  # like ZeroGPU's long-lived worker, stay until the tensors are received
    conn.close()


def test_gpu_stream_returns_the_state_across_a_process_boundary():
    import multiprocessing as mp

    from fm_demo.engine import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    engine = _tiny_engine()
    state = engine.new_state()
    before = state.clone()
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_run_gpu_stream_in_fork, args=(child, engine, state, ids))
    proc.start()
    items = parent.recv()
    parent.send("received")
    proc.join(30)
    events, update = items[:-1], items[-1]
    assert isinstance(update, zerogpu.StateUpdate) and len(events) == 5
    # Nothing the worker did reached the caller's state; the update carries it back.
    assert torch.equal(state.ssm, before.ssm) and state.seqlen == 0
    assert update.state.seqlen == 6 + 5 and update.state.device == torch.device("cpu")
    ref_state = engine.new_state()
    ref = [e.token_id for e in engine.stream(ids, ref_state, sampling=greedy, max_new_tokens=5)]
    assert [e.token_id for e in events] == ref
    assert torch.equal(update.state.ssm, ref_state.ssm) and torch.equal(update.state.conv, ref_state.conv)


def test_gpu_stream_in_process_advances_the_state_in_place_even_when_stopped():
    engine = _tiny_engine()
    stream = zerogpu.make_gpu_stream(lambda key: (engine, None))
    state = engine.new_state()
    gen = stream("tiny", state, torch.tensor([[1, 2, 3]]), max_new_tokens=10)
    first = [next(gen), next(gen)]
    gen.close()  # the visitor pressed stop
    assert len(first) == 2 and state.seqlen == 3 + 2


ZEROGPU_PROBE = """
import os, sys
os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL="http://127.0.0.1:9/")
from fm_demo import zerogpu
zerogpu.prepare()
def reply(n):
    yield n
wrapped = zerogpu.gpu_task(reply, duration=lambda n: 20)
import spaces.zero.decorator as d
print("wrapped" if wrapped is not reply and d.decorated_cache.get(reply) is wrapped else "not wrapped")
"""


@pytest.mark.skipif(torch.version.cuda is None, reason="spaces' ZeroGPU mode needs a CUDA build of torch")
def test_gpu_task_wraps_with_spaces_gpu_on_zerogpu():
    pytest.importorskip("spaces", reason="the `spaces` package is preinstalled on ZeroGPU Spaces only")
    out = subprocess.run([sys.executable, "-c", ZEROGPU_PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().endswith("wrapped") and "not wrapped" not in out.stdout, out.stderr[-2000:]


def test_hardware_info_names_the_space_and_its_hardware():
    info = zerogpu.hardware_info({"SPACE_ID": "me/fm", "SPACE_HARDWARE": "zero-a10g",
                                  "SPACES_ZERO_GPU": "true"})
    assert info["space"] == "me/fm" and info["hardware"].startswith("zero-a10g (ZeroGPU")
    assert info["device"].startswith("ZeroGPU")
    local = zerogpu.hardware_info({})
    assert local["space"] == "local run" and local["hardware"] == "not a Space"
    assert local["device"].startswith("CPU" if not torch.cuda.is_available() else "CUDA")


def test_zerogpu_start_up_loads_each_offered_model_once_and_visitors_only_use_them(monkeypatch):
    """app.py's start-up on ZeroGPU (its GPU calls run in-process here): the offered models load once,
    before launch; visitors' replies load nothing; a model that was not loaded then is refused."""
    from gradio_client import Client

    import app
    from fm_demo.models import ModelManager
    from fm_demo.settings import Settings

    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda env=None: True)
    monkeypatch.setattr(app, "on_zerogpu", zerogpu.on_zerogpu)
    monkeypatch.setattr(zerogpu, "gpu_task", lambda fn=None, *, duration=60: fn or (lambda f: f))
    loads = []
    real_load = ModelManager._load
    monkeypatch.setattr(ModelManager, "_load",
                        lambda self, preset, precision, progress: loads.append((preset.key, precision))
                        or real_load(self, preset, precision, progress))
    settings = Settings(device="cpu", offered_presets=("tiny-instruct", "tiny-base"))
    demo = app.build(settings)
    offered = [("tiny-base", "fp32"), ("tiny-instruct", "fp32")]
    assert sorted(loads) == offered  # each once, at start-up, before any visitor
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(),
                            quiet=True)
    try:
        for visitor in range(3):
            client = Client(url, verbose=False)
            for preset in ("tiny-instruct", "tiny-base"):
                reply = client.predict("Hello", max_new_tokens=4, preset=preset, api_name="/chat")
                assert isinstance(reply, str) and reply, (visitor, preset, reply)
        assert sorted(loads) == offered
        with pytest.raises(Exception, match=r"not served here: on ZeroGPU the models load once"):
            Client(url, verbose=False).predict("Hello", preset="tiny-base", precision="bf16", api_name="/chat")
        assert len(loads) == 2 and len(demo.fm_context.manager.loaded()) == 2
    finally:
        demo.close()


def test_zerogpu_offered_models_must_fit_together(monkeypatch):
    """On ZeroGPU a load never unloads another model (the GPU worker would lose it for good): the
    start-up fails with a message instead."""
    from fm_demo.models import ModelLoadError, ModelManager
    from fm_demo.settings import Settings

    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda env=None: True)
    monkeypatch.setattr(zerogpu, "gpu_task", lambda fn=None, *, duration=60: fn or (lambda f: f))
    one = ModelManager(Settings(device="cpu")).preload(["tiny-instruct"])[0]
    manager = ModelManager(Settings(device="cpu", model_memory_budget_bytes=int(one.nbytes * 1.5)))
    with pytest.raises(ModelLoadError, match="On ZeroGPU every offered model stays loaded"):
        manager.preload(["tiny-instruct", "tiny-base"])
    assert [lm.key for lm in manager.loaded()] == [("tiny-instruct", "fp32")]
