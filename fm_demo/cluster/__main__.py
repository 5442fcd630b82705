"""python -m fm_demo.cluster: deploy the app on a Ray cluster and serve it until Ctrl-C.

Takes every flag of `python app.py` (the server settings) plus the cluster settings, each also an
FM_DEMO_<NAME> variable. Connects to the Ray cluster `ray start` runs on this machine (or
--cluster-address), else starts a local one; serves HTTP where --host / --port say (default
127.0.0.1:8000; use 0.0.0.0 to accept other machines).
"""

from __future__ import annotations

import argparse
import os
import time

from ..settings import Settings
from .app import build_app
from .config import ClusterSettings, settings_env

DEFAULT_PORT = 8000


def parse(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m fm_demo.cluster", description=__doc__.splitlines()[0])
    Settings.add_cli_args(parser)
    ClusterSettings.add_cli_args(parser)
    parser.add_argument("--detach", action="store_true",
                        help="deploy to the running cluster (`ray start`) and return; `serve shutdown` "
                             "stops it")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "detach"}
    return given, args


def main(argv: list[str] | None = None) -> None:
    given, args = parse(argv)
    env = settings_env(given)
    cluster = ClusterSettings.from_env(env)
    settings = Settings.from_env(env, device="cpu")  # checks every value here, before anything starts
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine unasked
    import ray
    from ray import serve

    ray.init(address=cluster.cluster_address or None)
    host, port = settings.host or "127.0.0.1", settings.port or DEFAULT_PORT
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(given), name=cluster.cluster_app_name, route_prefix="/")
    print(f"Falcon Mamba on the cluster: http://{host}:{port}/", flush=True)
    if args.detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cluster.cluster_app_name)


if __name__ == "__main__":
    main()
