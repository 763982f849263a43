"""Ray Tune sweeps of joint RL over λ, LoRA depth k, rank r and learning rates, sharing one D and one engine pool.

    python -m pipelines.tune --config tune_configs/sweep_mmlu_offline.yaml
    ray job submit --working-dir . -- python -m pipelines.tune --config tune_configs/sweep_mmlu_llama_qwen.yaml

The `sweep:` section of the config names dotted fields and their spaces (see `haps_ray.config.SweepConfig`).
What is shared, and why it is exact:

- D, D_SFT and the SFT router are built once (`pipelines.run.prepare`: the stages data, dataset and sft of
  <run_dir>, skipped when an earlier `pipelines.run` or sweep finished them). They do not depend on λ, k or r: λ is
  applied when D is read (only the SFT labels, D_SFT, were chosen under the config's own reward.lam), and a trial whose head settings (k, r, ...) differ from the SFT router's gets the SFT
  backbone with fresh heads of its own shape (`trial_init_policy`).
- One `EnginePool` of frozen EngineActors serves every trial. The driver starts it before the first trial, outside
  every trial's placement group, wrapping the deepest k of the sweep; a trial with a smaller k sends adapters for
  its own (deepest) layers only, which equals an engine wrapped at exactly that k (haps_ray.lora). A trial reserves
  only its own process (`sweep.trial_num_cpus`) and its Learner (`rl.learner_*`); rollout workers take no CPU.
- λ is an outer grid: every value gets its own Tune experiment `<run_dir>/tune/lam_<λ>`, run one after the other,
  so ASHA and Optuna only ever compare rewards of one λ (a reward means something else under another λ).

Each trial is `train.train` on the shared pool with the trial's config, in <run_dir>/tune/trials/<experiment>/<id>/,
reporting every validation evaluation with `ray.tune.report(metrics, checkpoint=<the RL checkpoint>)`. Trials never
see test problems. A trial that raises is recorded as failed (its error in the table) and the sweep goes on. Rerunning
the command resumes: `Tuner.restore` of each experiment skips finished trials and continues unfinished ones from
their newest RL checkpoint. The pool is shut down at the end, on an error and on Ctrl-C (Tune stops the trials and
saves the experiment first; the command then exits with status 130 and can be rerun).

Outputs: <run_dir>/tune/results.{md,csv}, front.png (perf-cost front across λ), depth_rank.png (valid reward vs k
and r), Tune's experiment directories (TensorBoard events per trial: `tensorboard --logdir <run_dir>/tune`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from actors.engine import EnginePool
from haps_ray.checkpoint import Checkpoints, read_state
from haps_ray.config import ExperimentConfig, ParamSpace, config_from_dict, to_dict
from haps_ray.routing.policy import META_FILE, HAPSPolicy
from haps_ray.sweep_report import TrialRow, write_sweep_report
from haps_ray.training import TrainerState
from pipelines import common, run, sft, train

logger = logging.getLogger("pipelines.tune")

LAM = "reward.lam"
# RouterConfig fields that shape the hypernetwork heads or how they learn: a trial that differs from the SFT router
# in any of them starts from the SFT backbone with new heads
HEAD_FIELDS = ("lora_rank", "lora_alpha", "lora_layers", "hidden", "mlp_layers", "per_layer_adapters", "init",
               "backbone_grad")

Trial = Callable[..., None]


# ---------------------------------------------------------------------------------------------- the search space


def lambdas(cfg: ExperimentConfig) -> list[float]:
    """The outer grid of λ: every value of the space's reward.lam (grid or choice), else the config's own λ."""
    space = cfg.sweep.space.get(LAM)
    values = space.values if space is not None else [cfg.reward.lam]
    return list(dict.fromkeys(float(v) for v in values))


def tune_domain(space: ParamSpace) -> Any:
    low_high = space.uniform or space.loguniform
    return {"grid": lambda: tune.grid_search(space.grid), "choice": lambda: tune.choice(space.choice),
            "uniform": lambda: tune.uniform(*low_high), "loguniform": lambda: tune.loguniform(*low_high)}[space.kind]()


def param_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """Tune's param_space: every searched field but λ (flat dotted keys)."""
    return {key: tune_domain(space) for key, space in cfg.sweep.space.items() if key != LAM}


def deepest_k(cfg: ExperimentConfig) -> int:
    """The largest router.lora_layers any trial can have: what the shared engines wrap."""
    space = cfg.sweep.space.get("router.lora_layers")
    return max([cfg.router.lora_layers, *(space.values if space is not None else [])])


def trial_config(base: dict[str, Any], lam: float, params: dict[str, Any]) -> ExperimentConfig:
    """The base config (a dict, sweep section dropped) with λ and a trial's sampled values, validated."""
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                 for key, value in {LAM: lam, **params}.items()]
    return config_from_dict(base, overrides)


def scheduler_and_search(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """The Tune scheduler and search algorithm that `sweep.scheduler` / `sweep.search_alg` name (None = Tune's
    default: FIFO, random/grid search). Optuna is imported only when asked for."""
    sweep = cfg.sweep
    scheduler = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time is counted in evaluations (one tune.report each); max_t only needs to exceed any trial's count
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=sweep.grace_period, max_t=1_000_000)
    search = None
    if sweep.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SystemExit("error: sweep.search_alg=optuna needs Optuna: pip install optuna") from None
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=cfg.seed)
    return scheduler, search


def tune_config(cfg: ExperimentConfig) -> tune.TuneConfig:
    """Metric, mode, samples, concurrency, scheduler and search algorithm of each λ's experiment."""
    sweep = cfg.sweep
    scheduler, search = scheduler_and_search(cfg)
    return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                           max_concurrent_trials=sweep.max_concurrent_trials or None, scheduler=scheduler,
                           search_alg=search)


def best_evaluation(frame: Any, metric: str, mode: str) -> Any:
    """The row of a trial's reported evaluations (a DataFrame) with the best `metric`; None when there is none."""
    if frame is None or not len(frame) or metric not in frame:
        return None
    return frame.loc[frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()]


def trial_resources(cfg: ExperimentConfig, share_engines: bool) -> tune.PlacementGroupFactory:
    """What one trial reserves: its own process and its Learner (and, without sharing, its own engines)."""
    bundles = [{"CPU": cfg.sweep.trial_num_cpus}]
    learner = {k: v for k, v in (("CPU", cfg.rl.learner_num_cpus), ("GPU", cfg.rl.learner_num_gpus)) if v > 0}
    if learner:
        bundles.append(learner)
    if cfg.task.name == "hotpotqa":
        bundles.append({"CPU": 1.0})  # the trial's RetrieverActor (Ray's default actor reservation)
    if not share_engines:  # the naive sweep (benchmarks/tune_sharing.py): every trial loads every candidate
        for c in cfg.candidates:
            engine = {k: v for k, v in (("CPU", c.num_cpus), ("GPU", c.num_gpus)) if v > 0}
            bundles.extend([engine] * c.replicas if engine else [])
    return tune.PlacementGroupFactory(bundles)


# ---------------------------------------------------------------------------------------------- one trial


def trial_init_policy(cfg: ExperimentConfig, sft_policy: str, out: Path) -> str:
    """The policy a trial starts from: the SFT router itself when the trial's head settings are the SFT router's,
    else (once, under `out`) the SFT backbone with new heads for the trial's k, r, ... (seeded by `cfg.seed`)."""
    saved = json.loads((Path(sft_policy) / META_FILE).read_text())["router"]
    if all(saved[name] == getattr(cfg.router, name) for name in HEAD_FIELDS):
        return sft_policy
    target = out / "init_policy"
    if (target / META_FILE).is_file():
        return str(target)
    source = HAPSPolicy.load(sft_policy, device="cpu", seed=cfg.seed)
    policy = HAPSPolicy(source.router, sft.candidate_adapter_shapes(cfg), source.open_source, cfg.router,
                        feature_model=source.feature_model, seed=cfg.seed)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp)
    tmp.rename(target)
    return str(target)


def resume_from_tune_checkpoint(out: Path) -> None:
    """When the trial's own directory has no RL checkpoint but Tune hands one back (a restored trial whose directory
    was lost), put it where the RL trainer resumes from."""
    checkpoint = tune.get_checkpoint()
    ckpts = Checkpoints(out / "rl")
    if checkpoint is None or ckpts.latest() is not None:
        return
    with checkpoint.as_directory() as directory:
        state = read_state(directory)
        shutil.copytree(directory, ckpts.step(state.step))
    logger.info("trial resumes from Tune checkpoint at step %d", state.step)


def report_to_tune(state: TrainerState, metrics: dict[str, Any], checkpoint: Path) -> None:
    """The RL trainer's evaluation callback: the validation metrics and the policy checkpoint, to Tune."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update({"step": state.step, "best_step": -1 if state.best_step is None else state.best_step})
    tune.report(numbers, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))


def run_trial(params: dict[str, Any], *, base: dict[str, Any], lam: float, trials_dir: str, sft_policy: str,
              pool: EnginePool | None) -> None:
    """Tune's function trainable: joint RL with the trial's config on the shared pool (own engines if None)."""
    cfg = trial_config(base, lam, params)
    out = Path(trials_dir) / tune.get_context().get_trial_id()
    out.mkdir(parents=True, exist_ok=True)
    resume_from_tune_checkpoint(out)
    init = trial_init_policy(cfg, sft_policy, out)
    train.train(cfg, str(out), init_policy=init, callback=report_to_tune, pool=pool)


# ---------------------------------------------------------------------------------------------- the sweep


def experiment_name(lam: float) -> str:
    return f"lam_{lam:g}"


def fit_experiment(cfg: ExperimentConfig, base: dict[str, Any], lam: float, tune_dir: Path, sft_policy: str,
                   pool: EnginePool | None, trial: Trial) -> tune.ResultGrid:
    """Run (or resume) the Tune experiment of one λ; returns its results."""
    name = experiment_name(lam)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, lam=lam, trials_dir=str(tune_dir / "trials" / name),
                             sft_policy=sft_policy, pool=pool),
        trial_resources(cfg, share_engines=pool is not None))
    path = tune_dir / name
    if tune.Tuner.can_restore(str(path)):
        logger.info("λ=%g: resuming the Tune experiment at %s (finished trials are kept)", lam, path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune_config(cfg),
            run_config=tune.RunConfig(name=name, storage_path=str(tune_dir),
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1),
        )
    return tuner.fit()


def saved_trials(experiment: Path) -> dict[str, tuple[str, str]]:
    """Trial directory name -> (trial id, status) as the experiment's saved state has them: TERMINATED (ran to its
    end or was stopped by the scheduler), ERROR, or anything else for a trial an interruption left unfinished."""
    return {Path(t.path).name: (t.trial_id, t.status) for t in tune.ExperimentAnalysis(str(experiment)).trials}


def trial_rows(cfg: ExperimentConfig, base: dict[str, Any], lam: float, grid: tune.ResultGrid, tune_dir: Path) -> list[TrialRow]:
    """One row per trial of an experiment: its settings and its best validation evaluation by `sweep.metric`.
    Status: finished, stopped (by ASHA), failed (with the last line of its error) or unfinished (interrupted)."""
    name, rows = experiment_name(lam), []
    saved = saved_trials(tune_dir / name)
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items() if k in cfg.sweep.space}
        trial_cfg = trial_config(base, lam, params)
        trial_id, status = saved.get(Path(result.path).name, ("", "PENDING"))
        row = TrialRow(experiment=name, trial=trial_id or Path(result.path).name, lam=lam,
                       k=trial_cfg.router.lora_layers, r=trial_cfg.router.lora_rank, router_lr=trial_cfg.rl.router_lr,
                       generator_lr=trial_cfg.rl.generator_lr, params=params)
        best = best_evaluation(result.metrics_dataframe, cfg.sweep.metric, cfg.sweep.mode)
        if best is not None:
            row.reward, row.perf = float(best["valid/reward"]), float(best["valid/perf"])
            row.cost, row.best_step = float(best["valid/cost_usd"]), int(best["step"])
            row.evaluations = len(result.metrics_dataframe)
        if status == "ERROR" or result.error is not None:
            row.status = "failed"
            row.error = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        elif status == "TERMINATED":
            done = (tune_dir / "trials" / name / trial_id / "rl" / "summary.json").is_file()
            row.status = "finished" if done else "stopped"
        else:
            row.status = "unfinished"
        rows.append(row)
    return rows


def sweep(cfg: ExperimentConfig, run_dir: str, share_engines: bool = True, trial: Trial = run_trial) -> dict[str, Any]:
    """Prepare D and the SFT router (once), start the shared engine pool, run one Tune experiment per λ, write the
    results. Returns {"rows": [TrialRow], "report": paths, "interrupted": bool}. `share_engines=False` is the naive
    sweep that loads every candidate in every trial (for the benchmark); `trial` is the trainable (tests wrap it)."""
    run_dir = str(Path(run_dir).resolve())
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    prepared, stages = run.prepare(cfg, run_dir)
    sft_policy = stages.record["sft"]["result"]["best_policy"]
    # trials run elsewhere (their own working directories): absolute run_dir; they are tuned on valid, never test
    base_cfg = prepared.model_copy(update={"run_dir": run_dir, "task": prepared.task.model_copy(update={"test_path": ""})})
    base = to_dict(base_cfg)
    del base["sweep"]
    tune_dir = Path(run_dir) / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    pool = None
    rows: list[TrialRow] = []
    interrupted = False
    try:
        if share_engines:
            pool = EnginePool(base_cfg, lora_layers=deepest_k(cfg))
            pool.wait_ready()
            logger.info("shared engine pool: %s, o_proj of the last %d layers", pool.counts, pool.lora_layers)
        for lam in lambdas(cfg):
            grid = fit_experiment(cfg, base, lam, tune_dir, sft_policy, pool, trial)
            rows.extend(trial_rows(cfg, base, lam, grid, tune_dir))
            if any(row.status == "unfinished" for row in rows):  # Tune stopped early: Ctrl-C
                interrupted = True
                break
    finally:
        if pool is not None:
            pool.shutdown()
            logger.info("shared engine pool shut down")
    report = write_sweep_report(rows, tune_dir)
    return {"rows": rows, "report": report, "interrupted": interrupted}


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Ray Tune sweep of joint RL over the config's sweep: space")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: c.dataset.splits, "dataset.splits")
    if not cfg.sweep.space:
        print(f"error: {args.config}: sweep.space: empty, nothing to sweep", file=sys.stderr)
        return 2
    common.init_ray(cfg)
    run_dir = common.resolve_run_dir(cfg)
    common.save_resolved_config(cfg, run_dir, "config.tune.yaml")
    result = sweep(cfg, run_dir)
    print(result["report"]["md"].read_text())
    failed = sum(r.status == "failed" for r in result["rows"])
    print(f"{len(result['rows'])} trials ({failed} failed); results in {result['report']['md'].parent}; "
          f"TensorBoard: tensorboard --logdir {result['report']['md'].parent}")
    if result["interrupted"]:
        print("sweep interrupted: rerun the same command to resume it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
