"""SFT warm-up of the router on D_SFT, with the checkpoint chosen by the offline valid score from D.

    python -m pipelines.sft --config tune_configs/offline_mmlu.yaml [--set sft.epochs=1]
    ray job submit --working-dir . -- python -m pipelines.sft --config tune_configs/mmlu_llama_qwen.yaml

SFT runs in this one process (the driver; on a GPU when `router.device` finds one): a ~1B router on a few
hundred examples needs neither Ray nor more than one device. It reads, under `dataset.output` (default
`<run_dir>/dataset`, as written by `pipelines.build_dataset`): D (rewards derived with the frozen train
cost normaliser), D_sft.parquet and the problem texts of the train and valid splits. The hypernetwork
heads are sized from the open candidates' HF configs (no candidate weights are loaded).

Outputs under <run_dir>/sft/ (checkpoint layout: haps_ray/checkpoint.py; a rerun resumes from the newest):
    best/           the policy with the highest valid score
    last/           the policy after the last update
    checkpoints/    step_N at the latest evaluations (resume points)
    metrics/        metrics.jsonl (+ TensorBoard): sft/loss, sft/lr, sft/grad_norm per update; valid/* per evaluation
    summary.json
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.metrics import MetricsLogger
from haps_ray.models import model_config
from haps_ray.routing import HAPSPolicy, RoutingSpec, shapes_from_hf_config
from haps_ray.routing.sft import SFTTrainer, ValidSet, check_pool, evaluate_router, join_examples
from haps_ray.training import EvaluationCallback, planned_steps
from pipelines import common

logger = logging.getLogger("pipelines.sft")


def d_with_reward(cfg: ExperimentConfig, data_dir: str):
    """D with its derived reward; the cost normaliser is the frozen one build_dataset saved, when present."""
    d, _ = D.read_d(storage.join(data_dir, "D"))
    if d.num_rows == 0:
        raise FileNotFoundError(f"{storage.join(data_dir, 'D')}: D is empty (run pipelines.build_dataset first)")
    return D.with_reward(d, cfg.reward, common.load_normalizer(cfg))


def candidate_adapter_shapes(cfg: ExperimentConfig) -> dict[str, list[tuple[int, int]]]:
    """(d_in, d_out) of the last k o_proj layers of every open candidate, from its HF config."""
    return {c.name: shapes_from_hf_config(model_config(c.model), cfg.router.lora_layers) for c in cfg.open_candidates}


def run_sft(cfg: ExperimentConfig, run_dir: str, callback: EvaluationCallback | None = None) -> dict:
    """Run (or resume) SFT; returns {"best_policy": <checkpoint dir>, "last_policy": ..., metrics} (also in
    sft/summary.json). `callback` sees every evaluation."""
    if storage.is_s3(run_dir):
        raise ValueError(f"run_dir={run_dir}: SFT checkpoints need a local or shared-filesystem run_dir, not s3://")
    out = Path(run_dir) / "sft"
    data_dir = common.dataset_dir(cfg)
    spec = RoutingSpec.from_config(cfg)
    d = d_with_reward(cfg, data_dir)
    check_pool(d, spec, storage.join(data_dir, "D"))
    labels_uri = storage.join(data_dir, "D_sft.parquet")
    labels = storage.read_table(labels_uri)
    train_problems = {p.id: p for p in common.load_split(cfg, "train")}
    examples, skipped = join_examples(labels, train_problems, spec, "train", labels_uri)
    if not examples:
        raise ValueError(f"{labels_uri}: no usable train rows ({len(skipped)} skipped); see the warnings above")
    valid = None
    if cfg.task.valid_path and "valid" in set(d.column("split").to_pylist()):
        valid_problems = {p.id: p for p in common.load_split(cfg, "valid")}
        valid = ValidSet.from_tables(d, labels, valid_problems, spec, "valid", labels_uri)
    else:
        logger.warning("no valid split in D (or task.valid_path empty): SFT keeps its last state")

    torch.manual_seed(cfg.seed)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes=candidate_adapter_shapes(cfg))
    logger.info("SFT: %d examples (%d rows skipped), %d valid problems, router %s on %s", len(examples), len(skipped),
                len(valid.problems) if valid else 0, cfg.router.backbone, policy.router.device)
    metrics_log = MetricsLogger(out / "metrics")
    trainer = SFTTrainer(policy, cfg.sft, planned_steps(len(examples), cfg.sft.batch_size, cfg.sft.epochs, cfg.sft.max_steps))
    try:
        result = trainer.fit(
            examples, cfg, out,
            evaluate=(lambda: evaluate_router(policy, valid, cfg.sft.eval_batch_size)) if valid else None,
            log=metrics_log.log, callback=callback,
        )
    finally:
        metrics_log.close()
    summary = {
        "best_policy": str(out / "best"),
        "last_policy": str(out / "last"),
        "steps": result["steps"],
        "examples": len(examples),
        "skipped_rows": len(skipped),
        "skipped": skipped[:20],
        "valid_skipped": valid.skipped if valid else None,
        "best": result["best"],
        "last": result["last"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args("SFT warm-up of the router on D_SFT", argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: ["train"])
    run_dir = common.resolve_run_dir(cfg)
    common.save_resolved_config(cfg, run_dir, "sft_config.yaml")
    summary = run_sft(cfg, run_dir)
    best = summary["best"]
    print(f"SFT: {summary['steps']} updates on {summary['examples']} examples ({summary['skipped_rows']} rows skipped)")
    if "valid/score" in best:
        print(f"best checkpoint (step {best['step']}): valid score {best['valid/score']:.4f} "
              f"(mean {best['valid/reward_mean']:.4f}), label acc {best['valid/label_acc']:.3f}, "
              f"best-z acc {best['valid/best_acc']:.3f}; best fixed {best['valid/best_fixed']}: "
              f"score {best['valid/best_fixed_score']:.4f}, label acc {best['valid/best_fixed_label_acc']:.3f}")
    print(f"best policy: {summary['best_policy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
