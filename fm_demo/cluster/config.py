"""Cluster settings, and the server settings as the ingress and the model replicas see them.

ClusterSettings are parsed exactly like Settings: an FM_DEMO_<FIELD> variable or a --field-name
flag each (`python -m fm_demo.cluster --help`). A Serve config (serve.yaml) passes the same names
as its application's `args`, which `settings_env` turns into the same variables, so every way of
starting the app reads one set of names.

Every process builds its own Settings from those variables: a model replica resolves `auto`
(device, default preset, precision) on its own hardware; the ingress holds no model, so it takes
the replicas' resolved device, presets and precision rule (IngressSettings) and runs on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..settings import ENV_PREFIX, MiB, Preset, Settings, SettingsError, _help


@dataclass
class ClusterSettings:
    cluster_address: str = _help("Ray cluster to deploy to (host:port or ray://host:port); empty: the one "
                                 "`ray start` runs on this machine, else a new local one", "")
    cluster_app_name: str = _help("name of the Serve application", "falcon-mamba")
    cluster_min_replicas: int = _help("fewest model replicas the autoscaler keeps", 1)
    cluster_max_replicas: int = _help("most model replicas; 0: one per GPU of the cluster, or one per "
                                      "cluster_replica_cpus CPU cores where it has no GPU", 0)
    cluster_replica_cpus: int = _help("CPU cores reserved per model replica on a cluster without GPUs", 1)
    cluster_target_requests: int = _help("replies in progress per replica the autoscaler aims at; 0: half a "
                                         "replica's batch", 0)
    cluster_upscale_delay_s: float = _help("seconds of load above target before a replica is added", 30.0)
    cluster_downscale_delay_s: float = _help("seconds of load below target before a replica is removed",
                                             600.0)
    cluster_ingress_replicas: int = _help("replicas of the ingress (UI and APIs, no model); with more than "
                                          "one, each browser session sticks to one of them", 1)
    cluster_copy_state_bytes: int = _help("largest recurrent state copied off its replica at a turn's end "
                                          "and kept with the transcript on the ingress; 0: none (a lost "
                                          "replica's conversations are then rebuilt from their transcripts)",
                                          64 * MiB)

    def __post_init__(self) -> None:
        for name in ("cluster_min_replicas", "cluster_replica_cpus", "cluster_ingress_replicas"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("cluster_max_replicas", "cluster_target_requests", "cluster_copy_state_bytes",
                     "cluster_upscale_delay_s", "cluster_downscale_delay_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.cluster_max_replicas and self.cluster_max_replicas < self.cluster_min_replicas:
            raise SettingsError(f"cluster_max_replicas: {self.cluster_max_replicas} is below "
                                f"cluster_min_replicas {self.cluster_min_replicas}")

    # Parsed by Settings' own code: same variables, same flags, same error messages.
    from_env = classmethod(Settings.from_env.__func__)
    from_cli = classmethod(Settings.from_cli.__func__)
    add_cli_args = classmethod(Settings.add_cli_args.__func__)
    CLI_GROUP = "cluster settings (each also read from FM_DEMO_<NAME>)"


def settings_env(args: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> dict[str, str]:
    """FM_DEMO_* variables of this process, overridden by `args` (Settings or ClusterSettings field
    names, as a Serve config's application args give them); lists become comma separated."""
    known = {f.name for f in fields(Settings)} | {f.name for f in fields(ClusterSettings)}
    out = {k: v for k, v in (os.environ if env is None else env).items() if k.startswith(ENV_PREFIX)}
    for name, value in (args or {}).items():
        if name not in known:
            raise SettingsError(f"{name}: not a setting; known: {', '.join(sorted(known))}")
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def resolved_fields(settings: Settings) -> dict[str, Any]:
    """What a replica resolved from `auto`, for the ingress to use as given."""
    return {"device": settings.device, "default_preset": settings.default_preset,
            "compare_presets": settings.compare_presets}


@dataclass
class IngressSettings(Settings):
    """Settings of the ingress: it runs on the CPU and holds no model, while its choices (each preset's
    default precision, batch sizes, how many replies run at once) follow the model replicas."""

    replica_device: str = _help("device of the model replicas (the cluster app sets it)", "cpu")
    replica_count: int = _help("most model replicas (the cluster app sets it)", 1)

    @classmethod
    def for_replicas(cls, env: Mapping[str, str], resolved: Mapping[str, Any],
                     replicas: int) -> IngressSettings:
        given = {"default_preset": resolved["default_preset"],
                 "compare_presets": tuple(resolved["compare_presets"])}
        return cls.from_env(env, device="cpu", replica_device=resolved["device"], replica_count=replicas,
                            **given)

    def precision_for(self, preset: Preset | str) -> str:
        """Settings.precision_for on the replicas' device."""
        p = self.preset(preset) if isinstance(preset, str) else preset
        if self.precision in p.precisions:
            return self.precision
        if self.replica_device == "cpu" and "fp32" in p.precisions:
            return "fp32"
        return p.default_precision

    def batch_size_limit(self) -> int:
        return self.max_batch or (64 if self.replica_device == "cuda" else 32)

    def prefill_budget_tokens(self) -> int:
        return self.prefill_budget or (2048 if self.replica_device == "cuda" else 64)

    def event_concurrency(self) -> int:
        """Reply events the ingress runs at once: every batch row and waiting place of every replica."""
        return super().event_concurrency() * self.replica_count

    def torch_threads(self) -> int | None:
        return 1  # the ingress only tokenizes and keeps books
