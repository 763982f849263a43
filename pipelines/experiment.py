"""The paper's experiments as commands: each runs what it needs and writes the paper's table with our numbers beside it.

    python -m pipelines.experiment --name rq1 [--task hotpotqa|mmlu] [--pair L-Q|M-Q|L-M] [--offline]
    ray job submit --working-dir . -- python -m pipelines.experiment --name rq5

| name | paper | what runs (per task and pair) | table |
|---|---|---|---|
| rq1 | Table 2 | the HAPS pipeline (D, SFT, RL, evaluation with the baseline routers) | Random, RouteLLM, GraphRouter, IRT-Router, HAPS |
| rq2 | Table 3 | the HAPS run, plus a router trained without heads (w/o low-level) | random z, the four fixed z, w/o low-level, HAPS |
| rq3 | Figure 3 | the HAPS run, plus the w/o parameter sharing run | HAPS vs w/o sharing |
| rq4 | Figure 4 | a Tune sweep over the LoRA depth k | valid perf per k |
| rq5 | cost table | the HAPS pipeline at lambda 0.2, 0.5, 0.8 (one shared D) | perf, normalised cost, reward per lambda |
| rq6 | Figure 5 | the HAPS pipeline on the mixed open/closed pairs | HAPS, baselines, fixed z |

Runs live under `<run_root>/<task>_<pair>/<variant>` and are the ordinary resumable pipeline runs: an experiment reuses
every stage a previous experiment (or an interrupted run of this one) finished, so rq1, rq2 and rq3 train HAPS once.
The variants of a pair share its D (`dataset.output`): D does not depend on lambda or on how the router is trained.
`--offline` runs each experiment on the offline pair (SmolLM2-135M + Qwen2.5-Coder-0.5B, CPU, `offline_*.yaml`);
`--config` replaces the pair's config (one pair), and `--set` overrides fields of every run (e.g. smaller splits).
Outputs: `<run_root>/<name>/<task>/results.{md,csv,png}`; numbers are on the test split where the config has one,
else on valid (sweeps: valid). A row the runs did not produce is printed as "not run", never left out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haps_ray import paper_tables as paper
from haps_ray.config import ConfigError, ExperimentConfig, load_config, save_config
from haps_ray.report import ResultRow
from haps_ray.rl.cost import CostNormalizer
from pipelines import common

logger = logging.getLogger("pipelines.experiment")

CONFIGS = Path(__file__).resolve().parent.parent / "tune_configs"
PAIR_SLUGS = {"L-Q": "llama_qwen", "M-Q": "mistral_qwen", "L-M": "llama_mistral",
              "L-G": "llama_gpt41nano", "Q-D": "qwen_deepseekv3"}
OFFLINE_PAIR = "offline"
RQ5_PAIR = "L-Q14B"  # the paper's cost study: Llama-3.1-8B (small) with Qwen2.5-14B (large)
NAMES = ("rq1", "rq2", "rq3", "rq4", "rq5", "rq6")
TASKS = ("hotpotqa", "mmlu")
# The paper ran RQ4-RQ6 on HotpotQA only.
DEFAULT_TASKS = {"rq1": TASKS, "rq2": TASKS, "rq3": TASKS, "rq4": ("hotpotqa",), "rq5": ("hotpotqa",),
                 "rq6": ("hotpotqa",)}
RQ4_DEPTHS = (1, 2, 4)

# The variant runs' overrides (on top of the pair's config); their evaluated "HAPS" row is the variant's number.
VARIANTS = {
    "w/o low-level": ("router.low_level=false",),
    # the paper's decoupled variant: the router frozen after SFT, the heads on a separate backbone that RL trains
    "w/o parameter sharing": ("router.share_backbone=false", "rl.train_router=false"),
}
BASELINE_ROUTERS = ("RouteLLM", "GraphRouter", "IRT-Router")


@dataclass(frozen=True)
class Run:
    """One pipeline run (or sweep) an experiment needs: its config, overrides and directory."""

    variant: str
    config: Path
    overrides: tuple[str, ...]
    run_dir: Path
    sweep: bool = False


@dataclass
class Table:
    """The experiment's table: one row per method, our value and the paper's per column."""

    title: str
    columns: list[str]
    rows: dict[str, dict[str, tuple[float | None, float | None]]] = field(default_factory=dict)

    def set(self, method: str, column: str, ours: float | None, published: float | None) -> None:
        self.rows.setdefault(method, {})[column] = (ours, published)

    def markdown(self) -> str:
        head = "| method | " + " | ".join(f"{c} (ours) | {c} (paper)" for c in self.columns) + " |"
        lines = [f"### {self.title}", "", head, "|---|" + "---|---|" * len(self.columns)]
        for method, cells in self.rows.items():
            values = []
            for column in self.columns:
                ours, published = cells.get(column, (None, None))
                values += [_fmt(ours, "not run"), _fmt(published, "–")]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, Any]]:
        return [{"method": m, "column": c, "ours": o, "paper": p}
                for m, cells in self.rows.items() for c in self.columns for o, p in [cells.get(c, (None, None))]]


def _fmt(value: float | None, missing: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def config_for(name: str, task: str, pair: str) -> Path:
    """The shipped config of one experiment on one task and pair (the offline pair: `offline_<task>.yaml`)."""
    if pair == OFFLINE_PAIR:
        return CONFIGS / ("offline_mixed_mmlu.yaml" if name == "rq6" else f"offline_{task}.yaml")
    if name == "rq4":
        return CONFIGS / f"sweep_{task}_{PAIR_SLUGS[pair]}.yaml"
    return CONFIGS / f"{task}_{PAIR_SLUGS[pair]}.yaml"


def default_pairs(name: str, offline: bool) -> tuple[str, ...]:
    if offline:
        return (OFFLINE_PAIR,)
    return {"rq5": (RQ5_PAIR,), "rq6": paper.MIXED_PAIRS}.get(name, paper.OPEN_PAIRS)


def plan(name: str, task: str, pair: str, run_root: Path, config: Path | None = None,
         overrides: Sequence[str] = ()) -> list[Run]:
    """The runs experiment `name` needs on one task and pair, in the order they run."""
    if pair == RQ5_PAIR:
        if name != "rq5" or task != "hotpotqa":
            raise ValueError(f"pair {RQ5_PAIR} is the cost study's (rq5 on hotpotqa)")
        return [Run(f"lambda={lam}", CONFIGS / f"hotpotqa_llama_qwen14b_lam0{int(lam * 10)}.yaml", tuple(overrides),
                    run_root / f"{task}_{RQ5_PAIR}" / f"lam{lam}") for lam in paper.COST_LAMBDAS]
    base = config or config_for(name, task, pair)
    root = run_root / f"{task}_{pair}"
    shared_d = f"dataset.output={root / 'haps' / 'dataset'}"
    extra = tuple(overrides)
    # every experiment evaluates the HAPS run the same way (it is shared): with the fixed-z rows of Table 3
    haps = Run("HAPS", base, extra + ("evaluation.fixed_assignments=true",), root / "haps")
    if name in ("rq1", "rq6"):
        return [haps]
    if name == "rq2":
        return [haps, Run("w/o low-level", base, extra + VARIANTS["w/o low-level"] + (shared_d,), root / "no_low_level")]
    if name == "rq3":
        return [haps, Run("w/o parameter sharing", base, extra + VARIANTS["w/o parameter sharing"] + (shared_d,),
                          root / "no_sharing")]
    if name == "rq4":
        space = "sweep.space={router.lora_layers: {grid: [%s]}}" % ", ".join(map(str, RQ4_DEPTHS))
        return [Run("depth sweep", base, extra + (space,), root / "depth_sweep", sweep=True)]
    if name == "rq5":
        return [Run(f"lambda={lam}", base, extra + (f"reward.lam={lam}", f"dataset.output={root / 'lam_dataset'}"),
                    root / f"lam{lam}") for lam in paper.COST_LAMBDAS]
    raise ValueError(f"unknown experiment {name!r}: expected one of {', '.join(NAMES)}")


def load_run_config(run: Run) -> ExperimentConfig:
    """The run's config; D also covers the test split when the config has one, so that the tables' static rows (random
    and fixed z without adapters) are on the same split as HAPS's."""
    overrides = list(run.overrides) + [f"run_dir={run.run_dir}"]
    cfg = load_config(run.config, overrides=overrides)
    if not run.sweep and table_split(cfg) == "test" and "test" not in cfg.dataset.splits:
        cfg = load_config(run.config, overrides=overrides + [f"dataset.splits={[*cfg.dataset.splits, 'test']}"])
    return cfg


def table_split(cfg: ExperimentConfig) -> str:
    """The split an experiment reports: test where the config evaluates one, else valid."""
    return "test" if cfg.task.test_path and "test" in cfg.evaluation.splits else "valid"


def execute(run: Run) -> ExperimentConfig:
    """Run (or finish) one pipeline run or sweep; finished stages and trials are skipped. Returns the run's config."""
    from pipelines import run as pipeline
    from pipelines import tune

    cfg = load_run_config(run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.run_dir / "config.yaml")
    logger.info("%s: %s -> %s", run.variant, run.config.name, run.run_dir)
    if run.sweep:
        tune.sweep(cfg, str(run.run_dir))
    else:
        pipeline.run(cfg, str(run.run_dir))
    return cfg


def evaluation_rows(run_dir: Path) -> list[ResultRow]:
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        return []
    return [ResultRow(**row) for row in json.loads(path.read_text())]


def pick(rows: Sequence[ResultRow], method: str) -> ResultRow | None:
    """The method's row among one split's rows; None (printed "not run") when the runs did not produce it."""
    return next((r for r in rows if r.method == method), None)


def perf_percent(row: ResultRow | None) -> float | None:
    return None if row is None else 100 * row.perf


def role_label(cfg: ExperimentConfig, sides: tuple[int, ...]) -> str:
    names = [cfg.candidates[i].name for i in sides]
    return ", ".join(f"{role}={name}" for role, name in zip(cfg.task.roles, names))


def table_rq1(task: str, results: dict[str, dict[str, list[ResultRow]]]) -> Table:
    table = Table(f"RQ1 (Table 2): {task} perf (%)", list(results))
    for pair, variants in results.items():
        rows = variants.get("HAPS", [])
        published = paper.TABLE2
        table.set("Random", pair, perf_percent(pick(rows, "random z, no adapters (D)")), published["Random"][task].get(pair))
        for router in BASELINE_ROUTERS:
            key = "IRTRouter" if router == "IRT-Router" else router
            table.set(router, pair, perf_percent(pick(rows, router)), published[key][task].get(pair))
        table.set("HAPS", pair, perf_percent(pick(rows, "HAPS")), published["HAPS"][task].get(pair))
    return table


def table_rq2(task: str, results: dict[str, dict[str, list[ResultRow]]], configs: dict[str, ExperimentConfig]) -> Table:
    table = Table(f"RQ2 (Table 3): {task} perf (%)", list(results))
    sides = {"Left": 0, "Right": 1}
    for pair, variants in results.items():
        rows, cfg = variants.get("HAPS", []), configs[pair]
        published = {name: values[task].get(pair) for name, values in paper.TABLE3.items()}
        table.set("w/o High-Level (Random)", pair, perf_percent(pick(rows, "w/o high-level router (random z)")),
                  published["w/o High-Level (Random)"])
        for teacher in sides:
            for student in sides:
                label = f"w/o High-Level (Fixed): Teacher={teacher}, Student={student}"
                ours = pick(rows, f"w/o high-level router ({role_label(cfg, (sides[teacher], sides[student]))})")
                table.set(label, pair, perf_percent(ours), published[label])
        table.set("w/o Low-Level Router", pair, perf_percent(pick(variants.get("w/o low-level", []), "HAPS")),
                  published["w/o Low-Level Router"])
        table.set("HAPS", pair, perf_percent(pick(rows, "HAPS")), published["HAPS"])
    return table


def table_rq3(task: str, results: dict[str, dict[str, list[ResultRow]]]) -> Table:
    table = Table(f"RQ3 (Figure 3): {task} perf (%); paper: w/o sharing at most "
                  f"{paper.RQ3_MAX_DROP[task]} points below HAPS", list(results))
    for pair, variants in results.items():
        table.set("HAPS", pair, perf_percent(pick(variants.get("HAPS", []), "HAPS")), paper.TABLE2["HAPS"][task].get(pair))
        table.set("HAPS (w/o parameter sharing)", pair,
                  perf_percent(pick(variants.get("w/o parameter sharing", []), "HAPS")), None)
    return table


def sweep_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "tune" / "results.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def table_rq4(task: str, sweeps: dict[str, list[dict[str, str]]]) -> Table:
    table = Table(f"RQ4 (Figure 4): {task} valid perf (%) per LoRA depth k; paper: "
                  + "; ".join(f"{p}: {text}" for p, text in paper.RQ4_TEXT.items()), list(sweeps))
    for pair, rows in sweeps.items():
        by_k = {int(r["k"]): r for r in rows if r["status"] in ("finished", "stopped")}
        for k in RQ4_DEPTHS:
            row = by_k.get(k)
            table.set(f"HAPS, k={k}", pair, None if row is None else 100 * float(row["perf"]), None)
    return table


def unclipped_normalizer(cfg: ExperimentConfig) -> CostNormalizer | None:
    """The run's frozen train cost normaliser without clipping: it is affine then, so it maps a row's mean cost to the
    mean normalised cost exactly."""
    normalizer = common.load_normalizer(cfg)
    return None if normalizer is None else dataclasses.replace(normalizer, clip=False)


def table_rq5(task: str, results: dict[str, dict[str, list[ResultRow]]], configs: dict[str, ExperimentConfig]) -> Table:
    columns = [f"{metric} at lambda={lam}" for lam in paper.COST_LAMBDAS for metric in ("perf", "cost", "reward")]
    table = Table(f"RQ5 (cost table): {task}; perf as a fraction, cost min-max normalised on train", columns)
    for pair, variants in results.items():
        for lam in paper.COST_LAMBDAS:
            rows, cfg = variants.get(f"lambda={lam}", []), configs.get(f"{pair}/lambda={lam}")
            weak, strong = (None, None) if cfg is None else cheapest_and_dearest(cfg)
            normalizer = None if cfg is None else unclipped_normalizer(cfg)
            ours = {"All Weak": pick(rows, f"fixed {weak} (D)"), "All Strong": pick(rows, f"fixed {strong} (D)"),
                    "Random": pick(rows, "random z, no adapters (D)"), "HAPS": pick(rows, "HAPS")}
            ours.update({router: pick(rows, router) for router in BASELINE_ROUTERS})
            for method, row in ours.items():
                published = paper.COST_TABLE[method][lam]
                cost = None if row is None or normalizer is None else normalizer(row.cost)
                for metric, value, pub in zip(("perf", "cost", "reward"),
                                              (None if row is None else row.perf, cost,
                                               None if row is None else row.reward), published):
                    table.set(method, f"{metric} at lambda={lam}", value, pub)
    return table


def cheapest_and_dearest(cfg: ExperimentConfig) -> tuple[str, str]:
    """Assignment labels of the all-cheapest and all-dearest teams (by the candidates' summed token prices)."""
    prices = [c.price_in + c.price_out for c in cfg.candidates]
    cheap, dear = prices.index(min(prices)), prices.index(max(prices))
    return role_label(cfg, (cheap,) * len(cfg.task.roles)), role_label(cfg, (dear,) * len(cfg.task.roles))


def table_rq6(task: str, results: dict[str, dict[str, list[ResultRow]]], configs: dict[str, ExperimentConfig]) -> Table:
    table = Table(f"RQ6 (Figure 5): {task} perf (%) on mixed open/closed pairs", list(results))
    for pair, variants in results.items():
        rows, cfg = variants.get("HAPS", []), configs[pair]
        for method in ("HAPS", *BASELINE_ROUTERS):
            table.set(method, pair, perf_percent(pick(rows, method)), paper.FIGURE5.get(method, {}).get(pair))
        n = len(cfg.candidates)
        for z in [(a, b) for a in range(n) for b in range(n)]:
            label = role_label(cfg, z)
            table.set(f"fixed {label}", pair, perf_percent(pick(rows, f"fixed {label} (D)")), None)
    return table


def write_outputs(table: Table, out: Path) -> dict[str, Path]:
    """results.md (our values beside the paper's), results.csv (long form) and results.png (ours vs paper bars)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "plot": out / "results.png"}
    paths["markdown"].write_text(table.markdown())
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "column", "ours", "paper"])
        writer.writeheader()
        writer.writerows(table.records())
    plot(table, paths["plot"])
    return paths


def plot(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table.rows)
    fig, axes = plt.subplots(1, len(table.columns), figsize=(max(5, 0.9 * len(methods)) * len(table.columns), 4),
                             squeeze=False)
    for ax, column in zip(axes[0], table.columns):
        ours = [table.rows[m].get(column, (None, None))[0] for m in methods]
        published = [table.rows[m].get(column, (None, None))[1] for m in methods]
        xs = range(len(methods))
        ax.bar([x - 0.2 for x in xs], [v if v is not None else 0 for v in ours], 0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], [v if v is not None else 0 for v in published], 0.4, label="paper")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
    axes[0][0].legend()
    fig.suptitle(table.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(name: str, tasks: Sequence[str], pairs: Sequence[str], run_root: Path,
                   config: Path | None = None, overrides: Sequence[str] = ()) -> list[dict[str, Path]]:
    """Run every run the experiment needs (skipping finished work), then write one table per task."""
    outputs = []
    for task in tasks:
        results: dict[str, dict[str, list[ResultRow]]] = {}
        sweeps: dict[str, list[dict[str, str]]] = {}
        configs: dict[str, ExperimentConfig] = {}
        splits: set[str] = set()
        for pair in pairs:
            runs = plan(name, task, pair, run_root, config, overrides)
            for run in runs:
                cfg = execute(run)
                key = pair if name != "rq5" else f"{pair}/{run.variant}"
                configs[key] = cfg
                if run.sweep:
                    sweeps[pair] = sweep_rows(run.run_dir)
                else:
                    split = table_split(cfg)
                    splits.add(split)
                    results.setdefault(pair, {})[run.variant] = [r for r in evaluation_rows(run.run_dir) if r.split == split]
        table = {"rq1": lambda: table_rq1(task, results), "rq2": lambda: table_rq2(task, results, configs),
                 "rq3": lambda: table_rq3(task, results), "rq4": lambda: table_rq4(task, sweeps),
                 "rq5": lambda: table_rq5(task, results, configs), "rq6": lambda: table_rq6(task, results, configs)}[name]()
        if splits:
            table.title += f" [split: {', '.join(sorted(splits))}]"
        paths = write_outputs(table, run_root / name / task)
        print(table.markdown())
        logger.info("%s on %s: %s", name, task, paths["markdown"])
        outputs.append(paths)
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run one of the paper's experiments and write its table")
    parser.add_argument("--name", required=True, choices=NAMES)
    parser.add_argument("--task", choices=TASKS, help="Default: the tasks the paper ran the experiment on.")
    parser.add_argument("--pair", choices=[*PAIR_SLUGS, RQ5_PAIR], help="Default: every pair the paper ran it on.")
    parser.add_argument("--offline", action="store_true", help="Run it on the offline pair (CPU, no network).")
    parser.add_argument("--config", type=Path, help="Use this config instead of the pair's shipped one.")
    parser.add_argument("--run-root", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field in every run (repeatable; values parsed as YAML).")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    if args.offline and args.pair:
        parser.error("--offline runs the offline pair; leave out --pair")
    if args.name == "rq6" and args.pair and args.pair not in paper.MIXED_PAIRS:
        parser.error(f"rq6 runs the mixed pairs {', '.join(paper.MIXED_PAIRS)}")
    tasks = (args.task,) if args.task else DEFAULT_TASKS[args.name]
    pairs = (args.pair,) if args.pair else default_pairs(args.name, args.offline)
    if args.offline and args.name == "rq6":
        tasks = ("mmlu",)  # the offline mixed pool: the Qwen pack behind a loopback endpoint, on MMLU
    run_root = args.run_root.resolve()
    try:  # every run's config, before anything starts
        configs = [load_run_config(run) for task in tasks for pair in pairs
                   for run in plan(args.name, task, pair, run_root, args.config, args.overrides)]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    common.init_ray(configs[0])
    run_experiment(args.name, tasks, pairs, run_root, args.config, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
