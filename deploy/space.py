"""Spacefile -> Space bundle -> deploy with huggingface_hub.

    python -m deploy.space bundle OUT_DIR [--spacefile PATH]
    python -m deploy.space deploy [--dry-run] [--spacefile PATH] [--space-id ID] [--token T] [--endpoint URL]

`bundle` writes exactly what the Space needs: README.md whose front matter configures the Space,
requirements.txt for its hardware (the fused-kernel requirements on GPU hardware), and the app's
files: no tests, caches or checkpoints the chosen presets don't use. `deploy` builds the bundle in
a temporary folder and sends it with huggingface_hub: create the Space, request its hardware, set
its variables and secrets, upload (removing files of earlier deploys that the bundle no longer
has), then report the Space's runtime stage. `--dry-run` prints those calls and does none.
Secret values are read from SPACE_SECRET_<NAME> in the deploying shell and never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .manifest import REPO_ROOT, Spacefile, SpacefileError, load_spacefile, preset_local_path

DEFAULT_SPACEFILE = REPO_ROOT / "Spacefile"
HUB_FILE_PATTERNS = "*.json,*.safetensors"  # config, tokenizer and weights; skips .bin/.gguf copies
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".gradio", ".ipynb_checkpoints", "tests", ".git"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".lock", ".log")
SECRET_ENV_PREFIX = "SPACE_SECRET_"
PLACEHOLDER_OWNER = "your-name/"  # the examples' owner: deploying there needs --space-id


class BundleError(RuntimeError):
    """The bundle cannot be written as asked (non-empty folder, missing requirements)."""


# -- bundle ------------------------------------------------------------------------------------
def gradio_version() -> str:
    """The gradio the app pins in requirements.txt (else the installed one): the Space's sdk_version."""
    req = REPO_ROOT / "requirements.txt"
    text = req.read_text(encoding="utf-8") if req.is_file() else ""
    m = re.search(r"^\s*gradio(?:\[[^\]]*\])?\s*==\s*([\w.]+)", text, re.M)
    if m:
        return m.group(1)
    import gradio

    return gradio.__version__


def space_variables(sf: Spacefile) -> dict[str, str]:
    """The Space's public variables: the Spacefile's own, its presets, and the hardware flavor."""
    return {**sf.variables, "FM_DEMO_DEFAULT_PRESET": sf.default_preset,
            "FM_DEMO_OFFERED_PRESETS": ",".join(sf.presets), "SPACE_HARDWARE": sf.hardware.flavor}


def hub_presets(sf: Spacefile) -> dict[str, str]:
    """Offered presets that load from the Hub: key -> repo id (the others are bundled)."""
    from fm_demo.settings import PRESETS

    return {k: PRESETS[k].source for k in sf.presets if preset_local_path(PRESETS[k]) is None}


def render_readme(sf: Spacefile) -> str:
    from huggingface_hub import SpaceCardData

    from fm_demo.settings import PRESETS

    hub = hub_presets(sf)
    repos = list(dict.fromkeys(hub.values()))
    card = SpaceCardData(
        title=sf.title, emoji=sf.emoji, colorFrom=sf.color_from, colorTo=sf.color_to, sdk="gradio",
        sdk_version=gradio_version(), python_version=sf.python_version, app_file="app.py",
        pinned=False, license=sf.license, short_description=sf.short_description,
        suggested_hardware=sf.hardware.flavor, models=repos or None,
        preload_from_hub=[f"{r} {HUB_FILE_PATTERNS}" for r in repos] or None, tags=list(sf.tags) or None,
    )
    rows = "\n".join(f"| `{k}` | {PRESETS[k].label} | {hub.get(k, 'bundled with the app')} |"
                     for k in sf.presets)
    return (f"---\n{card.to_yaml()}\n---\n\n# {sf.title}\n\n{sf.short_description}\n\n"
            f"Runs on `{sf.hardware.flavor}` ({sf.hardware.label}). Default model: `{sf.default_preset}`.\n\n"
            f"| preset | model | weights |\n|---|---|---|\n{rows}\n")


def render_requirements(sf: Spacefile) -> str:
    """requirements.txt for the Space: the CPU set, plus the CUDA kernels set on GPU hardware."""
    names = ["requirements.txt"] + (["requirements-cuda.txt"] if sf.requirements == "cuda" else [])
    lines, seen = [f"# generated from {' + '.join(names)} for {sf.hardware.flavor}"], set()
    for name in names:
        path = REPO_ROOT / name
        if not path.is_file():
            raise BundleError(f"{name} not found in {REPO_ROOT}: the Space would not get its dependencies")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            # Both sets are inlined into one file, so references between them are dropped.
            if not line or line.startswith("#") or re.match(r"^(-r|--requirement)\s", line) or line in seen:
                continue
            seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"


def app_files(sf: Spacefile) -> list[Path]:
    """Paths (relative to the repo) of the app's files the Space needs."""
    from fm_demo.settings import PRESETS

    local = {k: preset_local_path(p) for k, p in PRESETS.items() if preset_local_path(p) is not None}
    needed = {k: path for k, path in local.items() if k in sf.presets}
    unused = set(local.values()) - set(needed.values())
    out = []
    for entry in sf.include:
        root = REPO_ROOT / entry
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            rel = path.relative_to(REPO_ROOT)
            if SKIP_DIRS.intersection(rel.parts) or path.name.endswith(SKIP_SUFFIXES):
                continue
            if any(path.resolve().is_relative_to(u) for u in unused):
                continue
            out.append(rel)
    for key, ckpt in needed.items():
        if not any((REPO_ROOT / rel).resolve().is_relative_to(ckpt) for rel in out):
            raise BundleError(f"preset {key} needs its checkpoint {ckpt}, "
                              "which bundle.include does not cover")
    return out


def bundle(sf: Spacefile, out_dir: str | Path) -> list[str]:
    """Write the Space's files into out_dir (which must be empty or absent); returns their paths."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder; "
                          "choose a new folder so nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rel in app_files(sf):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, out / rel)
        written.append(rel.as_posix())
    (out / "README.md").write_text(render_readme(sf), encoding="utf-8")
    (out / "requirements.txt").write_text(render_requirements(sf), encoding="utf-8")
    return sorted(written + ["README.md", "requirements.txt"])


# -- deploy ------------------------------------------------------------------------------------
@dataclass
class Call:
    """One huggingface_hub call of a deploy; `secret` marks kwargs whose value is never shown."""

    method: str
    kwargs: dict[str, Any]
    secret: bool = False

    def describe(self) -> str:
        shown = {k: ("***" if self.secret and k == "value" else v) for k, v in self.kwargs.items()}
        return f"{self.method}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def plan(sf: Spacefile, folder: str | Path, space_id: str,
         env: dict[str, str] | os._Environ = os.environ) -> tuple[list[Call], list[str]]:
    """The calls a deploy makes, in order, and notes about secrets left unchanged."""
    hw, sleep = sf.hardware.flavor, sf.sleep_time
    calls = [
        # exist_ok: redeploying updates the Space; the Hub ignores hardware here for an existing one.
        Call("create_repo", dict(repo_id=space_id, repo_type="space", space_sdk="gradio", private=sf.private,
                                 exist_ok=True, space_hardware=hw, space_sleep_time=sleep)),
        Call("request_space_hardware", dict(repo_id=space_id, hardware=hw, sleep_time=sleep)),
    ]
    calls += [Call("add_space_variable", dict(repo_id=space_id, key=k, value=v))
              for k, v in space_variables(sf).items()]
    notes = []
    for name, description in sf.secrets.items():
        value = env.get(SECRET_ENV_PREFIX + name, "")
        if value:
            calls.append(Call("add_space_secret", dict(repo_id=space_id, key=name, value=value,
                                                       description=description), secret=True))
        else:
            notes.append(f"secret {name} ({description}): {SECRET_ENV_PREFIX}{name} is not set here, so the "
                         "Space keeps whatever value it has; set it in the Space settings if it has none")
    calls.append(Call("upload_folder", dict(repo_id=space_id, repo_type="space", folder_path=str(folder),
                                            commit_message=f"Deploy from {Path(sf.path).name}",
                                            delete_patterns=["*"])))
    calls.append(Call("get_space_runtime", dict(repo_id=space_id)))
    return calls, notes


def deploy(sf: Spacefile, *, api=None, space_id: str | None = None, dry_run: bool = False,
           env: dict[str, str] | os._Environ = os.environ, say: Callable[[str], None] = print):
    """Bundle and push the Space; returns its SpaceRuntime (None on a dry run)."""
    space_id = space_id or sf.space_id
    if not dry_run and space_id.startswith(PLACEHOLDER_OWNER):
        raise RuntimeError(f"{space_id} is the example's id: set space.id in {sf.path} or pass --space-id")
    with tempfile.TemporaryDirectory(prefix="fm-space-") as tmp:
        files = bundle(sf, tmp)
        calls, notes = plan(sf, tmp, space_id, env)
        say(f"Space {space_id} on {sf.hardware.flavor}: {len(files)} files, presets {', '.join(sf.presets)}")
        for note in notes:
            say("note: " + note)
        if dry_run:
            for call in calls:
                say("would call " + call.describe())
            say("files: " + ", ".join(files))
            return None
        runtime = None
        for call in calls:
            say(call.describe())
            try:
                runtime = getattr(api, call.method)(**call.kwargs)
            except Exception as e:  # the Hub's message says what to fix (token scope, billing, ...)
                raise RuntimeError(f"{call.method} failed for {space_id}: {e}") from e
    say(f"Space {space_id}: stage {runtime.stage}, hardware {runtime.hardware or 'none yet'} "
        f"(requested {runtime.requested_hardware or sf.hardware.flavor})")
    return runtime


# -- CLI ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.space", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="write the Space's files into OUT_DIR")
    b.add_argument("out_dir")
    d = sub.add_parser("deploy", help="bundle and push to the Hub")
    d.add_argument("--dry-run", action="store_true", help="print the calls, make none")
    d.add_argument("--space-id", help="deploy to this Space instead of the Spacefile's space.id")
    d.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or your saved login)")
    d.add_argument("--endpoint", help="Hub endpoint (default: https://huggingface.co or HF_ENDPOINT)")
    for p in (b, d):
        p.add_argument("--spacefile", default=str(DEFAULT_SPACEFILE), help="manifest (default: ./Spacefile)")
    args = parser.parse_args(argv)
    try:
        sf = load_spacefile(args.spacefile)
        if args.command == "bundle":
            files = bundle(sf, args.out_dir)
            print(f"wrote {len(files)} files to {args.out_dir} for {sf.space_id} on {sf.hardware.flavor}")
            return 0
        api = None
        if not args.dry_run:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=args.endpoint, token=args.token)
        deploy(sf, api=api, space_id=args.space_id, dry_run=args.dry_run)
        return 0
    except (SpacefileError, BundleError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
