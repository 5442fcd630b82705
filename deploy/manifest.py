"""The Spacefile: the deployment manifest of the demo's Hugging Face Space, parsed and validated.

A Spacefile is TOML (docs/spacefile.md has the full reference):

    [space]                      id, title, emoji, short_description, hardware, sleep_time, ...
    [models]                     presets = [...] offered in the app, default = one of them
    [requirements]               set = "cpu" | "cuda" (default: cuda on GPU hardware)
    [variables]                  public environment variables of the Space (FM_DEMO_* settings)
    [secrets]                    NAME = "what it is for"; values come from the deploying shell
    [bundle]                     include = files and folders of the app copied into the Space

Validation collects every problem and names the field: `space.hardware: 'a10' is not a Space
hardware flavor; choose one of ...`. Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fm_demo.hardware import HARDWARE, HARDWARE_ALIASES, Hardware

REPO_ROOT = Path(__file__).resolve().parent.parent


_SPACE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PYTHON = re.compile(r"^3\.\d{1,2}(\.\d{1,2})?$")
_COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
_TOKEN_LIKE = re.compile(r"^(hf_|api_)[A-Za-z0-9]{20,}$")
SHORT_DESCRIPTION_MAX = 60  # the Hub rejects longer ones
ZEROGPU_PYTHONS = ("3.10", "3.12")  # the interpreters ZeroGPU provides

_FIELDS: dict[str, tuple[str, ...]] = {
    "space": ("id", "title", "emoji", "color_from", "color_to", "short_description", "license",
              "hardware", "sleep_time", "private", "python_version", "tags"),
    "models": ("presets", "default"),
    "requirements": ("set",),
    "bundle": ("include",),
}
_FREE_TABLES = ("variables", "secrets")  # keys are user-chosen names


class SpacefileError(ValueError):
    """A Spacefile that cannot be used; the message lists every wrong field and why."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path, self.problems = str(path), problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Spacefile:
    path: Path
    space_id: str
    title: str
    emoji: str
    color_from: str
    color_to: str
    short_description: str
    license: str
    hardware: Hardware
    sleep_time: int | None  # seconds of inactivity before sleeping; None = Hub default
    private: bool
    python_version: str
    tags: tuple[str, ...]
    presets: tuple[str, ...]
    default_preset: str
    requirements: str  # "cpu" | "cuda"
    variables: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # name -> description (never a value)
    include: tuple[str, ...] = ("app.py", "fm_demo")

    @property
    def on_gpu(self) -> bool:
        return self.hardware.kind in ("gpu", "zerogpu")

    @property
    def zerogpu(self) -> bool:
        return self.hardware.kind == "zerogpu"


def load_spacefile(path: str | Path) -> Spacefile:
    """Parse and validate a Spacefile; raises SpacefileError naming every wrong field."""
    path = Path(path)
    if not path.is_file():
        raise SpacefileError(path, ["file not found"])
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpacefileError(path, [f"not valid TOML: {e}"]) from e
    return parse_spacefile(raw, path)


def parse_spacefile(raw: dict[str, Any], path: Path | str = "<Spacefile>") -> Spacefile:
    v = _Validator(raw)
    v.check_tables()
    space, models = raw.get("space", {}), raw.get("models", {})
    hardware = v.hardware(space.get("hardware"))
    presets = v.presets(models.get("presets"), hardware)
    default = v.default_preset(models.get("default"), presets)
    sf = dict(
        path=Path(path),
        space_id=v.string("space.id", space.get("id"), pattern=_SPACE_ID,
                          why="must be 'owner/name' (letters, digits, '.', '_', '-')"),
        title=v.string("space.title", space.get("title", "Falcon Mamba Chat")),
        emoji=v.string("space.emoji", space.get("emoji", "🐍")),
        color_from=v.choice("space.color_from", space.get("color_from", "indigo"), _COLORS),
        color_to=v.choice("space.color_to", space.get("color_to", "green"), _COLORS),
        short_description=v.short_description(space.get("short_description")),
        license=v.string("space.license", space.get("license", "apache-2.0")),
        hardware=hardware,
        sleep_time=v.sleep_time(space.get("sleep_time"), hardware),
        private=v.boolean("space.private", space.get("private", False)),
        python_version=v.string("space.python_version", space.get(
            "python_version", f"{sys.version_info.major}.{sys.version_info.minor}"),
            pattern=_PYTHON, why="must look like '3.11' or '3.11.9'"),
        tags=tuple(v.string_list("space.tags", space.get("tags", []))),
        presets=tuple(presets),
        default_preset=default,
        requirements=v.requirements(raw.get("requirements", {}).get("set"), hardware),
        variables=v.variables(raw.get("variables", {}), presets, default),
        secrets=v.secrets(raw.get("secrets", {}), raw.get("variables", {})),
        include=tuple(v.include(raw.get("bundle", {}).get("include", ["app.py", "fm_demo"]))),
    )
    if hardware.kind == "zerogpu" and not sf["python_version"].startswith(ZEROGPU_PYTHONS):
        v.fail("space.python_version",
               f"ZeroGPU runs Python {' or '.join(ZEROGPU_PYTHONS)}, not {sf['python_version']}")
    if v.problems:
        raise SpacefileError(path, v.problems)
    return Spacefile(**sf)


class _Validator:
    """Collects problems instead of stopping at the first, so one run shows every fix needed."""

    def __init__(self, raw: dict[str, Any]):
        self.raw, self.problems = raw, []

    def fail(self, where: str, why: str) -> None:
        self.problems.append(f"{where}: {why}")

    def check_tables(self) -> None:
        for name, value in self.raw.items():
            if name not in _FIELDS and name not in _FREE_TABLES:
                self.fail(name, f"unknown table; known tables: {', '.join([*_FIELDS, *_FREE_TABLES])}")
            elif not isinstance(value, dict):
                self.fail(name, f"must be a table ([{name}]), got {type(value).__name__}")
        for name, known in _FIELDS.items():
            table = self.raw.get(name, {})
            for key in table if isinstance(table, dict) else ():
                if key not in known:
                    self.fail(f"{name}.{key}", f"unknown field; known fields: {', '.join(known)}")
        if not isinstance(self.raw.get("space"), dict):
            self.fail("space", "missing table: a Spacefile needs [space] with at least id and hardware")
            self.raw["space"] = {}
        for name in (*_FIELDS, *_FREE_TABLES):
            if not isinstance(self.raw.get(name, {}), dict):
                self.raw[name] = {}

    def string(self, where: str, value: Any, pattern: re.Pattern | None = None, why: str = "") -> str:
        if value is None:
            self.fail(where, "required")
            return ""
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"must be a non-empty string, got {value!r}")
            return ""
        if pattern is not None and not pattern.match(value):
            self.fail(where, f"{value!r} {why}")
        return value

    def choice(self, where: str, value: Any, options: tuple[str, ...]) -> str:
        if value not in options:
            self.fail(where, f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    def boolean(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"must be true or false, got {value!r}")
        return bool(value)

    def string_list(self, where: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            self.fail(where, f"must be a list of non-empty strings, got {value!r}")
            return []
        return value

    def short_description(self, value: Any) -> str:
        text = self.string("space.short_description", value)
        if len(text) > SHORT_DESCRIPTION_MAX:
            self.fail("space.short_description",
                      f"{len(text)} characters; the Hub allows at most {SHORT_DESCRIPTION_MAX}")
        return text

    def hardware(self, value: Any) -> Hardware:
        flavor = HARDWARE_ALIASES.get(value, value) if isinstance(value, str) else value
        if flavor in HARDWARE:
            return HARDWARE[flavor]
        known = ", ".join([*HARDWARE, *HARDWARE_ALIASES])
        self.fail("space.hardware", "required" if value is None else
                  f"{value!r} is not a Space hardware flavor; choose one of {known}")
        return HARDWARE["cpu-basic"]

    def sleep_time(self, value: Any, hw: Hardware) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (value < 300 and value != -1):
            self.fail("space.sleep_time", f"must be seconds >= 300, or -1 to never sleep; got {value!r}")
        elif hw.free:
            self.fail("space.sleep_time", f"{hw.flavor} is free hardware whose sleep time the Hub fixes; "
                      "remove sleep_time or choose paid hardware")
        return value

    def presets(self, value: Any, hw: Hardware) -> list[str]:
        from fm_demo.settings import PRESETS

        if value is None:
            self.fail("models.presets", "required: the presets the Space offers")
            return []
        keys = self.string_list("models.presets", value)
        for key in keys:
            if key not in PRESETS:
                self.fail("models.presets", f"unknown preset {key!r}; known: {', '.join(PRESETS)}")
            elif (why := preset_unfit(PRESETS[key], hw)) is not None:
                self.fail("models.presets", f"{key!r} cannot run on {hw.flavor}: {why}")
        if len(set(keys)) != len(keys):
            self.fail("models.presets", "lists a preset twice")
        return keys

    def default_preset(self, value: Any, presets: list[str]) -> str:
        if value is None:
            return presets[0] if presets else ""
        if value not in presets:
            self.fail("models.default", f"{value!r} is not among models.presets {presets}")
        return str(value)

    def requirements(self, value: Any, hw: Hardware) -> str:
        if value is None:
            return "cpu" if hw.kind == "cpu" else "cuda"
        if value not in ("cpu", "cuda"):
            self.fail("requirements.set", f"{value!r} is not 'cpu' or 'cuda'")
        elif value == "cuda" and hw.kind == "cpu":
            self.fail("requirements.set", f"'cuda' needs GPU hardware; {hw.flavor} has none")
        return str(value)

    def variables(self, table: dict[str, Any], presets: list[str], default: str) -> dict[str, str]:
        out = {}
        for name, value in table.items():
            if not _ENV_NAME.match(name):
                self.fail(f"variables.{name}", "not a valid environment variable name")
            elif isinstance(value, (dict, list)) or value is None:
                self.fail(f"variables.{name}", f"must be a string, number or boolean, got {value!r}")
            else:
                out[name] = str(value).lower() if isinstance(value, bool) else str(value)
        if presets:
            self.problems += check_settings_env(out, presets, default)
        return out

    def secrets(self, table: dict[str, Any], variables: Any) -> dict[str, str]:
        out = {}
        for name, description in table.items():
            where = f"secrets.{name}"
            if not _ENV_NAME.match(name):
                self.fail(where, "not a valid environment variable name")
            elif not isinstance(description, str):
                self.fail(where, "must be a short description of what the secret is for")
            elif _TOKEN_LIKE.match(description.strip()):
                self.fail(where, "looks like a secret value; the Spacefile only names secrets, "
                          "their values come from your environment at deploy time")
            elif isinstance(variables, dict) and name in variables:
                self.fail(where, "is also a public variable; a name is either a variable or a secret")
            else:
                out[name] = description
        return out

    def include(self, value: Any) -> list[str]:
        paths = self.string_list("bundle.include", value)
        for p in paths:
            if Path(p).is_absolute() or ".." in Path(p).parts:
                self.fail("bundle.include", f"{p!r} must be a path inside the repository")
            elif not (REPO_ROOT / p).exists():
                self.fail("bundle.include", f"{p!r} does not exist in {REPO_ROOT}")
        if "app.py" not in paths:
            self.fail("bundle.include", "must contain app.py, the Space's app_file")
        return paths


def preset_local_path(preset) -> Path | None:
    """The checkpoint folder of a preset that loads from disk (the bundled tiny models); None for a
    hub repo id. The folder may not exist yet (checked by `preset_unfit`)."""
    source = Path(preset.source)
    if source.is_absolute():
        return source.resolve()
    return (REPO_ROOT / source).resolve() if (REPO_ROOT / source).exists() else None


def preset_unfit(preset, hw: Hardware) -> str | None:
    """Why `preset` cannot serve on `hw`, or None when it can."""
    if (local := preset_local_path(preset)) is not None:
        if not local.is_dir():
            return f"its checkpoint {local} does not exist yet, so it cannot be bundled"
        if not local.is_relative_to(REPO_ROOT):
            return f"its checkpoint {local} is outside the repository, so it cannot be bundled"
        return None  # the bundled tiny checkpoints run anywhere
    if hw.kind == "cpu":
        return (f"it loads {preset.source}, a 7B model that needs a GPU; offer the tiny presets on CPU "
                "hardware or choose a GPU flavor")
    if "bf16" in str(preset.default_precision) and not hw.bf16:
        return f"{hw.label} has no native bfloat16 and 16 GB; offer a 4-bit preset instead"
    return None


MODEL_VARIABLES = ("FM_DEMO_DEFAULT_PRESET", "FM_DEMO_OFFERED_PRESETS")  # written from [models]


def check_settings_env(variables: dict[str, str], presets: list[str], default: str) -> list[str]:
    """Check FM_DEMO_* variables against the app's Settings, so a typo fails here, not on the Space."""
    from dataclasses import fields

    from fm_demo.settings import ENV_PREFIX, Settings, extra_preset

    problems, known = [], {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    ours = {k: v for k, v in variables.items() if k.startswith(ENV_PREFIX)}
    for name in ours:
        if name in MODEL_VARIABLES:
            problems.append(f"variables.{name}: set by [models]; remove it here")
        elif name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "`python app.py --help` lists the settings"
            problems.append(f"variables.{name}: the app has no such setting; {hint}")
    problems += [f"[models]: the app's Settings cannot read {name}, so the Space would ignore it"
                 for name in MODEL_VARIABLES if name not in known]
    compare = [k.strip() for k in ours.get(ENV_PREFIX + "COMPARE_PRESETS", "").split(",") if k.strip()]
    if not compare:
        problems.append(f"variables.{ENV_PREFIX}COMPARE_PRESETS: required: two of models.presets for the "
                        "compare tab (the app's automatic pair depends on the machine)")
    problems += [f"variables.{ENV_PREFIX}COMPARE_PRESETS: {k!r} is not among models.presets {presets}"
                 for k in compare if k not in presets]
    if problems:
        return problems
    # This machine may lack the Space's GPU: check the values as if on CPU.
    models = {"FM_DEMO_DEFAULT_PRESET": default, "FM_DEMO_OFFERED_PRESETS": ",".join(presets)}
    try:
        settings = Settings.from_env({**ours, **models, ENV_PREFIX + "DEVICE": "cpu"})
    except ValueError as e:
        return [f"variables: the app rejects these settings: {e}"]
    # A directory here exists on this machine only: the Space would stop at start-up without it.
    return [f"variables.{ENV_PREFIX}EXTRA_MODELS: {p.source} is a local checkpoint, which the Space does "
            "not get (the bundle carries the app only); push it to the Hub and name its repo id"
            for p in map(extra_preset, settings.extra_models) if p.local]
