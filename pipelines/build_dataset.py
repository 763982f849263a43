"""Build the action-level dataset D, then D_SFT and the static baselines from it.

    python -m pipelines.build_dataset --config tune_configs/offline_mmlu.yaml --set task.n_train=20
    ray job submit --working-dir . -- python -m pipelines.build_dataset --config tune_configs/mmlu_llama_qwen.yaml

Outputs under `dataset.output` (default `<run_dir>/dataset`, local or s3://):
    D/split=<split>/part-*.parquet   one row per (problem, z); schema: haps_ray.dataset.D_SCHEMA
    cost_normalizer.json             min-max bounds of episode cost fitted on D's train rows (frozen after)
    D_sft.parquet, sft_labels.md     best z per problem (dataset.tie_policy / drop_all_zero / balance)
    baselines.md, baselines.csv      every fixed z, uniform random, oracle, per split
    summary.json                     the build report, label summary and headroom
Re-running the same command resumes: (problem, z) already in D are skipped.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

import pyarrow as pa

from actors.dataset_builder import BuildReport, DatasetBuilder
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.dataset_labels import label_summary_markdown, sft_labels, static_baselines, write_baselines
from haps_ray.rl.cost import CostNormalizer
from pipelines import common

logger = logging.getLogger("pipelines.build_dataset")


def output_dir(cfg: ExperimentConfig) -> str:
    """`dataset.output`, or `<run_dir>/dataset`, resolved like the run directory."""
    if cfg.dataset.output:
        return common.resolve_location(cfg.dataset.output)
    return storage.join(common.resolve_run_dir(cfg), "dataset")


def frozen_normalizer(d: pa.Table, out: str, clip: bool = True) -> CostNormalizer | None:
    """Fit on D's train rows and save; without train rows, load the one saved by an earlier build.

    `clip` (the config's `reward.clip_cost`) is recorded with the bounds and overrides a loaded one.
    """
    uri = storage.join(out, "cost_normalizer.json")
    if "train" in set(d.column("split").to_pylist()):
        normalizer = D.fit_cost_normalizer(d, clip=clip)
        normalizer.save(uri)
        return normalizer
    return replace(CostNormalizer.load(uri), clip=clip) if storage.exists(uri) else None


def write_tables(cfg: ExperimentConfig, out: str) -> dict:
    """D_SFT, label summary, baselines and the frozen cost normaliser from the D under `out`."""
    d, duplicates = D.read_d(storage.join(out, "D"))
    normalizer = frozen_normalizer(d, out, cfg.reward.clip_cost)
    d = D.with_reward(d, cfg.reward, normalizer)
    labels, label_summary = sft_labels(d, cfg.dataset.tie_policy, cfg.dataset.drop_all_zero, cfg.dataset.balance, cfg.seed)
    storage.write_table(labels, storage.join(out, "D_sft.parquet"))
    storage.write_text(storage.join(out, "sft_labels.md"), label_summary_markdown(label_summary))
    rows, headroom = static_baselines(d)
    write_baselines(rows, headroom, out)
    return {"rows": d.num_rows, "duplicates_on_read": duplicates, "sft_labels": label_summary, "headroom": headroom,
            "cost_normalizer": normalizer.to_dict() if normalizer else None,
            "baselines": [r.__dict__ for r in rows]}


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args("Build the action-level dataset D, D_SFT and static baselines", argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args)
    out = output_dir(cfg)
    common.init_ray(cfg)
    common.save_resolved_config(cfg, out, "build_config.yaml")
    problems = {split: common.load_split(cfg, split) for split in cfg.dataset.splits}
    report: BuildReport = DatasetBuilder(cfg, storage.join(out, "D")).build(problems)
    tables = write_tables(cfg, out)
    summary = {"build": report.to_dict(), **tables}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    print(f"D: {tables['rows']} rows at {storage.join(out, 'D')} ({report.committed_episodes} run now, "
          f"{report.already_present} already present, {report.requeued_batches} batches re-queued, "
          f"{report.episodes_per_s:.2f} episodes/s)")
    print(storage.read_text(storage.join(out, "baselines.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
