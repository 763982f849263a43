"""The whole HAPS pipeline for one config, end to end: data → D → SFT → baselines → joint RL → evaluation.

    python -m pipelines.run --config tune_configs/demo_mmlu_offline.yaml        # what `make demo` runs
    ray job submit --working-dir . -- python -m pipelines.run --config tune_configs/<name>.yaml

Each stage writes under <run_dir>; a stage that finished is recorded in <run_dir>/stages.json and skipped
when the command is run again (D building and RL also resume from inside a stage), so an interrupted run
continues where it stopped. `--fresh` deletes the run directory first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from haps_ray.config import ExperimentConfig, save_config
from haps_ray.metrics import format_seconds
from pipelines import baselines, build_dataset, common, data, evaluate, sft, train

logger = logging.getLogger("pipelines.run")

STAGES = ("data", "dataset", "sft", "baselines", "rl", "evaluate")


def with_prepared_data(cfg: ExperimentConfig, summary: dict) -> ExperimentConfig:
    """The config with every split pointing at its prepared Parquet file, taken whole (n_<split> = 0)."""
    update = {}
    for split, info in summary["splits"].items():
        update[f"{split}_path"] = info["uri"]
        update[f"n_{split}"] = 0
    return cfg.model_copy(update={"task": cfg.task.model_copy(update=update)})


class StageLog:
    """<run_dir>/stages.json: which stages finished, in how long, with what result; `run` skips a finished one."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "stages.json"
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, work: Callable[[], object]) -> None:
        if name in self.record:
            logger.info("stage %s: done in an earlier run, skipped", name)
            return
        logger.info("stage %d/%d: %s", STAGES.index(name) + 1, len(STAGES), name)
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        self.record[name] = {"seconds": seconds, "result": result}
        self.path.write_text(json.dumps(self.record, indent=2, default=str))
        logger.info("stage %s finished in %s", name, format_seconds(seconds))


def prepare(cfg: ExperimentConfig, run_dir: str) -> tuple[ExperimentConfig, StageLog]:
    """Run (or skip, when done) the stages before RL: data, D and SFT. Returns the config on the prepared splits and
    the stage log (`record["sft"]["result"]["best_policy"]` is the SFT router). A Tune sweep starts from here too."""
    root = Path(run_dir)
    stages = StageLog(root)
    stages.run("data", lambda: data.prepare(cfg, str(root / "data")))
    prepared = with_prepared_data(cfg, stages.record["data"]["result"])
    save_config(prepared, root / "config.prepared.yaml")
    stages.run("dataset", lambda: build_dataset.build(prepared)["build"])
    stages.run("sft", lambda: sft.run_sft(prepared, run_dir))
    return prepared, stages


def run(cfg: ExperimentConfig, run_dir: str) -> dict:
    """Run (or continue) every stage; returns per-stage wall times and the final results table."""
    prepared, stages = prepare(cfg, run_dir)
    record = stages.record
    init_policy = record["sft"]["result"]["best_policy"]
    # the baseline routers read D only (not the SFT router), so a Tune sweep, which starts from `prepare`, skips them
    stages.run("baselines", lambda: baselines.fit_baselines(prepared, run_dir))
    stages.run("rl", lambda: train.train(prepared, run_dir, init_policy=init_policy))
    stages.run("evaluate", lambda: [dataclasses.asdict(r) for r in evaluate.evaluate(prepared, run_dir, record["rl"]["result"]["best_policy"])])
    return {"seconds": {k: v["seconds"] for k, v in record.items()}, "table": (Path(run_dir) / "eval" / "results.md").read_text()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("The whole HAPS pipeline: data, D, SFT, joint RL, evaluation")
    parser.add_argument("--fresh", action="store_true", help="Delete the run directory and start over.")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: c.dataset.splits, "dataset.splits")
    run_dir = common.resolve_run_dir(cfg)
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    common.init_ray(cfg)
    common.save_resolved_config(cfg, run_dir)
    started = time.perf_counter()
    summary = run(cfg, run_dir)
    print(summary["table"])
    for name, seconds in summary["seconds"].items():
        print(f"{name:>9}: {format_seconds(seconds)}")
    print(f"total wall time this invocation: {format_seconds(time.perf_counter() - started)}; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
