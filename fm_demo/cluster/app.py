"""The Serve application: `build_app(args)` is its builder, for `python -m fm_demo.cluster`,
`serve run fm_demo.cluster.app:build_app [name=value ...]` and `serve deploy fm_demo/cluster/serve.yaml`.

    HTTP -> Serve proxy -> Ingress (UI + APIs, transcripts, kept states; no model; CPU)
                              -> FalconMamba replicas (models, batching schedulers, prefix caches)

Model replicas: one GPU each on a cluster with GPUs, else `cluster_replica_cpus` CPU cores each;
between cluster_min_replicas and cluster_max_replicas (autoscaled on replies in progress when
they differ). `args` are setting names (Settings and ClusterSettings fields) with their values,
over the FM_DEMO_* variables of the process that builds the app.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..settings import ENV_PREFIX, Settings
from .config import ClusterSettings, IngressSettings, resolved_fields, settings_env

MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT = "FalconMamba", "Ingress"
CLUSTER_PREFIX = ENV_PREFIX + "CLUSTER_"
API_KEY_VAR = ENV_PREFIX + "API_KEY"
INGRESS_MAX_ONGOING = 1000  # open HTTP requests per ingress replica: each browser tab holds a stream


def replica_device(env: Mapping[str, str]) -> str:
    """cuda when the settings or the cluster's resources say so, else cpu."""
    import ray

    asked = env.get("FM_DEMO_DEVICE", "auto").strip() or "auto"
    if asked in ("cpu", "cuda"):
        return asked
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def resolve_on_replicas(env: Mapping[str, str], device: str) -> dict[str, Any]:
    """Settings' `auto` choices (device, presets) as a model replica will make them: on a GPU node
    for a GPU cluster (a short task there), here otherwise."""
    if device == "cpu":
        return resolved_fields(Settings.from_env(env, device="cpu"))
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def resolve() -> dict[str, Any]:
        return resolved_fields(Settings.from_env(env, device="cuda"))

    return ray.get(resolve.remote())


def replica_options(cluster: ClusterSettings, settings: Settings, device: str) -> dict[str, Any]:
    """Serve options of the model deployment: resources, replica counts, routing, concurrency."""
    from ray.serve.config import RequestRouterConfig

    actor = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": cluster.cluster_replica_cpus}
    lo = cluster.cluster_min_replicas
    hi = cluster.cluster_max_replicas or max(lo, replica_room(device, cluster))
    target = cluster.cluster_target_requests or max(1, settings.batch_size_limit() // 2)
    scaling: dict[str, Any] = {"num_replicas": lo}
    if hi > lo:
        scaling = {"autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            "target_ongoing_requests": target,
            "upscale_delay_s": cluster.cluster_upscale_delay_s,
            "downscale_delay_s": cluster.cluster_downscale_delay_s}}
    router = RequestRouterConfig(request_router_class="fm_demo.cluster.router:AffinityRouter")
    return {"name": MODEL_DEPLOYMENT, "ray_actor_options": actor,
            "max_ongoing_requests": settings.event_concurrency(), "request_router_config": router, **scaling}


def replica_room(device: str, cluster: ClusterSettings) -> int:
    """Replicas the cluster's resources hold now (GPUs, or CPU groups): sizes the ingress's concurrency
    without tying it to the replica counts, so scaling them is a light update that restarts nothing."""
    import ray

    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1)) // cluster.cluster_replica_cpus)


def server_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the ingress starts from: the server settings, not the cluster's (changing
    replica counts must not restart the replicas or the ingress)."""
    return {k: v for k, v in env.items() if not k.startswith(CLUSTER_PREFIX)}


def replica_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables a model replica starts from: no API key (it serves no HTTP)."""
    return {k: v for k, v in server_env(env).items() if k != API_KEY_VAR}


def ingress_options(cluster: ClusterSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"name": INGRESS_DEPLOYMENT, "num_replicas": cluster.cluster_ingress_replicas,
                               "ray_actor_options": {"num_cpus": 0},
                               "max_ongoing_requests": INGRESS_MAX_ONGOING}
    if cluster.cluster_ingress_replicas > 1:  # a browser session's requests must reach one replica
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="fm_demo.cluster.router:SessionRouter")
    return options


def build_app(args: Mapping[str, Any] | None = None):
    """The application: the ingress bound to the model deployment (Ray must be initialised)."""
    from ray import serve

    from .ingress import Ingress
    from .replica import ModelReplica

    env = settings_env(args)
    cluster = ClusterSettings.from_env(env)
    device = replica_device(env)
    resolved = resolve_on_replicas(env, device)
    per_replica = IngressSettings.for_replicas(env, resolved, 1)  # batch sizes on the replicas' device
    options = replica_options(cluster, per_replica, device)
    models = serve.deployment(ModelReplica).options(**options).bind(replica_env(env), resolved)
    return serve.deployment(Ingress).options(**ingress_options(cluster)).bind(
        server_env(env), resolved, replica_room(device, cluster), cluster.cluster_copy_state_bytes, models)
