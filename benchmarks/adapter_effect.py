"""How far generated adapters move a real engine under the RL update path, per (lora_alpha, generator_lr, init).

    python benchmarks/adapter_effect.py [--config tune_configs/offline_mmlu.yaml] [--engine smollm2] [--steps 20]
        [--settings 0.01:1e-5:zero 0.01:1e-5:authors 0.01:1e-3:zero 1:1e-4:zero] [--device cpu|cuda]

Issue 18 asks why the adapters barely move at the paper's settings (alpha 0.01, zero-initialised up-projection,
generator lr 1e-5). This drives the real joint update (`JointLearner.update` with per-sample adapter gradients from
`LLMEngine.adapter_grads`) with the strongest signal REINFORCE can give: every rollout is the problem's correct
answer, advantage +1, so each step is likelihood ascent on it. The router's decision is fixed (one candidate, one
role) and its backbone frozen; only the heads learn. Every `--every` steps it prints, on the train and held-out
problems: the mean change of the answer's per-token log-prob against the frozen engine (no adapter), the relative
size of the adapter, ||alpha B A||_F / ||W_o||_F, and the heads' update. Needs ../shared/data (the offline MMLU split).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from haps_ray.config import load_config  # noqa: E402
from haps_ray.engine.llm import LLMEngine  # noqa: E402
from haps_ray.rl.learner import JointLearner  # noqa: E402
from haps_ray.rl.losses import generator_weights  # noqa: E402
from haps_ray.routing.policy import HAPSPolicy  # noqa: E402
from haps_ray.tasks import make_episode  # noqa: E402
from pipelines import common  # noqa: E402


def parse_setting(text: str) -> tuple[float, float, str]:
    alpha, lr, init = text.split(":")
    return float(alpha), float(lr), init


def answer_texts(problems: list) -> list[str]:
    return [f"Answer: {p.answer}" for p in problems]


def student_prompts(cfg, problems, engine_name: str) -> list:
    prompts = []
    for p in problems:
        episode = make_episode(cfg.task, p, {"student": engine_name, "teacher": engine_name})  # its first call is the Student's
        prompts.append(episode.pending_call().messages)
    return prompts


def mean_token_logp(engine: LLMEngine, prompts, targets, adapters) -> list[float]:
    scores = engine.score(prompts, targets, adapters)
    return [float(sum(s)) / max(len(s), 1) for s in scores]


def relative_delta(adapters, weight: torch.Tensor) -> float:
    """Mean over samples of ||alpha B A||_F / ||W_o||_F (deepest wrapped layer)."""
    norms = []
    for ad in adapters:
        delta = ad.alpha * ad.B[-1].float() @ ad.A[-1].float()
        norms.append(float(delta.norm() / weight.float().norm()))
    return statistics.fmean(norms)


def run_setting(cfg, engine: LLMEngine, engine_name: str, train, held_out, steps: int, every: int) -> list[dict]:
    torch.manual_seed(cfg.seed)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes={engine_name: engine.info()["adapter_shapes"]})
    learner = JointLearner(policy, cfg.rl, total_steps=steps)
    weight = engine.lora[-1].base_layer.weight
    data = {}
    for split, problems in (("train", train), ("held_out", held_out)):
        prompts, targets = student_prompts(cfg, problems, engine_name), answer_texts(problems)
        data[split] = (problems, prompts, targets, mean_token_logp(engine, prompts, targets, [None] * len(problems)))
    heads = list(policy.parameter_groups()["heads"])
    start = [p.detach().clone() for p in heads]
    rows = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            row = {"step": step}
            for split, (problems, prompts, targets, base) in data.items():
                adapters = [plan.adapters[engine_name] for plan in learner.plans_for(problems, [(0,)] * len(problems))]
                logp = mean_token_logp(engine, prompts, targets, adapters)
                row[f"{split}_dlogp"] = statistics.fmean(a - b for a, b in zip(logp, base))
                row[f"{split}_rel_dW"] = relative_delta(adapters, weight)
            row["heads_moved"] = float(torch.sqrt(sum((p.detach() - s).pow(2).sum() for p, s in zip(heads, start))))
            rows.append(row)
            logging.info("step %d: %s", step, {k: f"{v:.3g}" for k, v in row.items() if k != "step"})
        if step == steps:
            break
        problems, prompts, targets, _ = data["train"]
        plans = learner.propose(problems, mode="greedy", for_update=True)
        adapters = [plan.adapters[engine_name] for plan in plans]
        grads = engine.adapter_grads(prompts, targets, adapters, weights=generator_weights([1.0] * len(problems)))
        learner.update(problems, [(0,)] * len(problems), [0.0] * len(problems),
                       [{engine_name: g} for g in grads])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tune_configs/offline_mmlu.yaml")
    parser.add_argument("--engine", default="smollm2", help="Candidate whose adapters are trained.")
    parser.add_argument("--problems", type=int, default=8, help="Train problems (and as many held-out ones).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["0.01:1e-5:zero", "0.01:1e-5:authors", "0.01:1e-3:zero",
                                                          "1:1e-4:zero", "1:1e-3:zero"],
                        help="alpha:generator_lr:init triples (init: zero | authors).")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = load_config(args.config, overrides=[
        f"task.n_train={args.problems}", f"task.n_valid={args.problems}", "task.roles=[student]", "task.max_rounds=1",
        f"router.device={args.device}", "rl.router_lr=0.0", "rl.reinforce_router=false"])
    candidate = next(c for c in base.candidates if c.name == args.engine)
    base = base.model_copy(update={"candidates": [candidate.model_copy(update={"device": args.device})]})
    train, held_out = common.load_split(base, "train"), common.load_split(base, "valid")
    engine = LLMEngine.from_config(base.candidates[0], base.router.lora_layers)
    print(f"engine {candidate.model}, router {base.router.backbone}, {len(train)} train / {len(held_out)} held-out "
          f"problems, {args.steps} updates, device {args.device}")
    print("| alpha | generator lr | init | step | train dlogp/token | held-out dlogp/token | ||dW||/||W|| | heads moved | setting wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for text in args.settings:
        alpha, lr, init = parse_setting(text)
        cfg = base.model_copy(update={
            "router": base.router.model_copy(update={"lora_alpha": alpha, "init": init}),
            "rl": base.rl.model_copy(update={"generator_lr": lr}),
        })
        started = time.perf_counter()
        for row in run_setting(cfg, engine, args.engine, train, held_out, args.steps, args.every):
            print(f"| {alpha:g} | {lr:g} | {init} | {row['step']} | {row['train_dlogp']:+.4f} | {row['held_out_dlogp']:+.4f} | "
                  f"{row['train_rel_dW']:.2e} | {row['heads_moved']:.3g} | {time.perf_counter() - started:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
