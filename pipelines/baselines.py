"""Fit the baseline routers (RouteLLM, GraphRouter, IRT-Router, HierRouter) on the action-level dataset D.

    python -m pipelines.baselines --config tune_configs/offline_mmlu.yaml [--set baselines.routers=[routellm,irt]]

Reads D's train and valid rows (λ and shaping applied on read with the frozen train cost normaliser), embeds the
problems of both splits once with `baselines.encoder` (cached under <run_dir>/baselines/embeddings), fits each
router of `baselines.routers` on train, selects it on valid, and saves it to <run_dir>/baselines/<router>/. A
router already saved there is kept (the stage resumes); delete its directory to refit. Writes
<run_dir>/baselines/summary.{json,md} (valid reward vs oracle, fit seconds). HierRouter trains with RLlib's PPO on
the Ray this process joins. `pipelines.evaluate` then adds every fitted baseline as a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.baselines import LABELS, ROUTERS, BaselineRouter, RouterSpec, RoutingData, load, routing_data
from haps_ray.baselines.base import META_FILE
from haps_ray.baselines.embeddings import QueryEncoder
from haps_ray.config import ExperimentConfig
from haps_ray.tasks import Problem
from pipelines import common

logger = logging.getLogger("pipelines.baselines")

FIT_SPLITS = ("train", "valid")


def baselines_dir(run_dir: str) -> str:
    return storage.join(run_dir, "baselines")


def encoder_for(cfg: ExperimentConfig, run_dir: str) -> QueryEncoder:
    return QueryEncoder.from_config(cfg, cache_dir=storage.join(baselines_dir(run_dir), "embeddings"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread while the small baseline models train: their full-batch steps are latency-bound, and on
    a shared CPU more threads only spin against each other (200 epochs: ~1 s on one thread, ~40 s on two, loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_data(cfg: ExperimentConfig, encoder: QueryEncoder, problems: dict[str, Sequence[Problem]]
             ) -> tuple[RouterSpec, dict[str, RoutingData]]:
    """D's train and valid splits as `RoutingData` for the config's pool (errors name a candidate D lacks)."""
    d_uri = storage.join(common.dataset_dir(cfg), "D")
    if not storage.exists(d_uri):
        raise FileNotFoundError(f"no D at {d_uri}: build it first (python -m pipelines.build_dataset)")
    table, _ = D.read_d(d_uri, list(FIT_SPLITS))
    table = D.with_reward(table, cfg.reward, common.load_normalizer(cfg))
    spec = RouterSpec.from_config(cfg)
    embeddings = {p.id: e for split in FIT_SPLITS for p, e in zip(problems[split], encoder.encode(problems[split]))}
    z_embeddings = encoder.encode_texts([spec.assignment_text(z) for z in spec.assignments])
    return spec, {split: routing_data(table, split, spec, embeddings, z_embeddings) for split in FIT_SPLITS}


def make_router(name: str, spec: RouterSpec, cfg: ExperimentConfig) -> BaselineRouter:
    if name == "hierrouter":
        from actors.hierrouter import RLlibPPOTrainer  # RLlib only for the router that trains with it

        return ROUTERS[name](spec, cfg.baselines, cfg.seed, trainer=RLlibPPOTrainer())
    return ROUTERS[name](spec, cfg.baselines, cfg.seed)


def fit_baselines(cfg: ExperimentConfig, run_dir: str, problems: dict[str, Sequence[Problem]] | None = None) -> dict[str, Any]:
    """Fit (or keep, when saved) every router of `baselines.routers`; returns {router: summary} (also written)."""
    out = baselines_dir(run_dir)
    if not cfg.baselines.routers:
        logger.info("baselines.routers is empty: no baseline router fitted")
        return {}
    todo = [n for n in cfg.baselines.routers if not storage.exists(storage.join(out, n, META_FILE))]
    summaries: dict[str, Any] = {}
    if todo:
        problems = problems or {split: common.load_split(cfg, split) for split in FIT_SPLITS}
        with one_thread():
            encoder = encoder_for(cfg, run_dir)
            spec, data = fit_data(cfg, encoder, problems)
            for name in todo:
                started = time.perf_counter()
                router = make_router(name, spec, cfg)
                summary = router.fit(data["train"], data["valid"])
                router.summary = {**summary, "fit_seconds": time.perf_counter() - started}
                router.save(storage.join(out, name))
    for name in cfg.baselines.routers:
        if name not in todo:
            logger.info("baseline %s: fitted in an earlier run, kept", name)
        summaries[name] = json.loads(storage.read_text(storage.join(out, name, META_FILE)))["summary"]
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summaries, indent=2))
    storage.write_text(storage.join(out, "summary.md"), summary_markdown(summaries))
    return summaries


def summary_markdown(summaries: dict[str, Any]) -> str:
    lines = ["| router | valid reward | valid oracle | selected at | fit (s) |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        at = f"epoch {s['best_epoch']}" if "best_epoch" in s else f"iteration {s.get('best_iteration')}"
        lines.append(f"| {LABELS[name]} | {s['valid_reward']:.4f} | {s['valid_oracle']:.4f} | {at} | {s.get('fit_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def load_fitted(cfg: ExperimentConfig, run_dir: str) -> dict[str, BaselineRouter]:
    """label -> fitted router, for every router of `baselines.routers` saved under <run_dir>/baselines."""
    out = baselines_dir(run_dir)
    fitted = {}
    for name in cfg.baselines.routers:
        uri = storage.join(out, name)
        if storage.exists(storage.join(uri, META_FILE)):
            fitted[LABELS[name]] = load(uri)
        else:
            logger.info("baseline %s: not fitted (no %s), left out of the table", name, uri)
    return fitted


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Fit the baseline routers on D")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: FIT_SPLITS, "baselines")
    if "hierrouter" in cfg.baselines.routers:
        common.init_ray(cfg)
    run_dir = common.resolve_run_dir(cfg)
    fit_baselines(cfg, run_dir)
    print(storage.read_text(storage.join(baselines_dir(run_dir), "summary.md")) if cfg.baselines.routers else "no routers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
