"""Serve a trained HAPS policy as an OpenAI-compatible API on Ray Serve (blocks; Ctrl-C shuts it down cleanly).

    python -m pipelines.serve --config tune_configs/demo_mmlu_offline.yaml --policy runs/demo_mmlu_offline/rl/best
    serve run pipelines.serve:build_app config=tune_configs/demo_mmlu_offline.yaml policy=runs/demo_mmlu_offline/rl/best
    ray job submit --working-dir . -- python -m pipelines.serve --config C --policy /abs/path/rl/best

Host, port, replicas, batch limits, queue limits, timeouts and the bearer-token variable come from the config's
`serve:` section (under `serve run`, Serve's own --host/--port options place the HTTP proxy instead). The
deployments are in actors/serving.py; requests and answers are described in the README's "Serving" section.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ray import serve

from actors import serving as deployments
from haps_ray.config import ExperimentConfig, load_config
from pipelines import common

logger = logging.getLogger("pipelines.serve")


def start(cfg: ExperimentConfig, policy: str) -> str:
    """Start Serve's HTTP proxy on `serve.host:serve.port` and deploy the app; returns the API base URL."""
    policy = common.resolve_location(policy)
    app = deployments.build_app(cfg, policy)  # checks the policy against the config before anything starts
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=deployments.APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    logger.info("HAPS served at %s (models: haps, %s)", url, ", ".join(c.name for c in cfg.candidates))
    return url


def stop() -> None:
    serve.delete(deployments.APP_NAME)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run pipelines.serve:build_app config=<yaml> policy=<dir> [set=k=v,...]`."""
    unknown = sorted(set(args) - {"config", "policy", "set"})
    if unknown or "config" not in args or "policy" not in args:
        raise ValueError(f"build_app takes config=<yaml> policy=<dir> [set=key=value,...]; got {sorted(args)}")
    overrides = [o for o in str(args.get("set", "")).split(",") if o]
    cfg = load_config(args["config"], overrides=overrides)
    return deployments.build_app(cfg, common.resolve_location(args["policy"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Serve a trained HAPS policy as an OpenAI-compatible API (Ray Serve)")
    parser.add_argument("--policy", required=True, help="Policy checkpoint directory (e.g. <run_dir>/rl/best).")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args)
    common.init_ray(cfg)
    done = threading.Event()
    # `ray job stop` and `kill` send SIGTERM: shut down as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        start(cfg, args.policy)
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:  # also while the app is still starting: what is up already is taken down
        pass
    logger.info("shutting down the HAPS app")
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
