"""Routing latency per 1,000 queries of each baseline router against HAPS's router, batch 32, CPU.

    python -m benchmarks.baselines                                   # offline MMLU pair, MiniLM encoder
    python -m benchmarks.baselines --haps-queries 256 --results benchmarks/RESULTS.md

Queries are MMLU questions from `task.train_path` of the config (default `tune_configs/offline_mmlu.yaml`). For
each baseline two figures: encoding (the `baselines.encoder`, cold cache: every text through the model) and routing
from the embeddings (the router alone); their sum is what a request pays. The baselines are fitted on a D of random
rewards for these questions (latency does not depend on what they learned; GraphRouter's graph holds the 128 train
queries); HierRouter's policy is its untrained `PolicyNet` (the same network PPO trains). HAPS's router is
`HAPSPolicy.act(mode="greedy")` on `router.backbone`: one packed backbone pass over the routing prompts scoring
every z, plus the heads writing each chosen open candidate's adapter. HAPS runs `--haps-queries` queries and the
figure is scaled to 1,000. One torch thread unless `--threads` says otherwise. With `--results`, the
"## Baseline routing latency" section of that Markdown file is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import pyarrow as pa
import torch

from benchmarks.results import write_section
from haps_ray import dataset as D
from haps_ray.baselines import LABELS, ROUTERS, RouterSpec, routing_data
from haps_ray.baselines.embeddings import QueryEncoder
from haps_ray.config import BaselinesConfig, load_config
from haps_ray.routing import HAPSPolicy
from haps_ray.tasks import load_problems

BATCH = 32
N_QUERIES = 1000


def timed(fn, items, batch: int = BATCH) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to run `fn` over `items` in batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(items), batch):
        fn(items[start:start + batch])
    return time.perf_counter() - wall, time.process_time() - cpu


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {memory:.0f} GiB, {gpu}"


def random_d(ids: list[str], split: str, names: list[str], num_roles: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    zs = D.assignments(len(names), num_roles)
    perf = torch.rand(len(ids), len(zs), generator=g).round()
    return [{"split": split, "problem_id": pid, "z_index": j, "z": list(z), "engine_names": names, "perf": float(perf[i, j]),
             "cost": 1.0 + sum(z)} for i, pid in enumerate(ids) for j, z in enumerate(zs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tune_configs/offline_mmlu.yaml")
    parser.add_argument("--haps-queries", type=int, default=256, help="Queries HAPS routes (scaled to 1,000).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    problems = load_problems("mmlu", cfg.task.train_path)[0]
    queries = (problems * (N_QUERIES // len(problems) + 1))[:N_QUERIES]
    queries = [type(p)(**{**p.__dict__, "id": f"q{i}"}) for i, p in enumerate(queries)]  # distinct ids, same texts
    spec = RouterSpec.from_config(cfg)
    names = spec.candidates

    encoder = QueryEncoder.from_config(cfg)  # no cache dir: every text is encoded
    encode_s = timed(encoder.encode, queries)
    embeddings = encoder.encode(queries)  # cached now
    fit_q, valid_q = queries[:128], queries[128:160]
    table = D.with_reward(pa.Table.from_pylist(random_d([p.id for p in fit_q], "train", names, len(spec.roles), 0)
                                               + random_d([p.id for p in valid_q], "valid", names, len(spec.roles), 1)),
                          cfg.reward)
    by_id = {p.id: e for p, e in zip(queries, embeddings)}
    z_emb = encoder.encode_texts([spec.assignment_text(z) for z in spec.assignments])
    train, valid = (routing_data(table, s, spec, by_id, z_emb) for s in ("train", "valid"))
    rows = []
    for name, cls in ROUTERS.items():
        router = cls(spec, BaselinesConfig(epochs=5), seed=0)
        if name == "hierrouter":
            router._fresh(train)  # untrained PolicyNet: same network and cost as the PPO-trained one
        else:
            router.fit(train, valid)
        route_s = timed(router.route_embeddings, embeddings)
        rows.append((LABELS[name], encode_s, route_s))

    policy = HAPSPolicy.from_config(cfg).eval()
    haps = queries[:args.haps_queries]
    with torch.no_grad():
        policy.act(haps[:BATCH], mode="greedy")  # warm-up
        haps_s = tuple(t * N_QUERIES / len(haps) for t in timed(lambda b: policy.act(b, mode="greedy"), haps))

    lines = ["## Baseline routing latency", "",
             f"`python -m benchmarks.baselines --haps-queries {args.haps_queries} --threads {args.threads}` on "
             f"{machine()}, {time.strftime('%Y-%m-%d')}: {N_QUERIES} MMLU questions from "
             f"`{cfg.task.train_path}`, batch {BATCH}, {args.threads} torch thread(s), CPU. Encoder "
             f"`{cfg.baselines.encoder}` (cold: every text encoded); HAPS = `HAPSPolicy.act(greedy)` on "
             f"`{cfg.router.backbone}` ({len(haps)} queries, scaled to {N_QUERIES}).", "",
             "Seconds per 1,000 queries, wall (CPU seconds of the process in brackets: on a shared machine wall time "
             "depends on what else runs, CPU time much less).", "",
             "| router | encode | route | total | HAPS total / this total (CPU) |", "|---|---|---|---|---|"]

    def cell(t: tuple[float, float], digits: int = 2) -> str:
        return f"{t[0]:.{digits}f} ({t[1]:.{digits}f})"

    for label, enc, route in rows:
        total = (enc[0] + route[0], enc[1] + route[1])
        lines.append(f"| {label} | {cell(enc)} | {cell(route, 3)} | {cell(total)} | {haps_s[1] / total[1]:.0f}x |")
    lines.append(f"| HAPS router (backbone + heads) | – | {cell(haps_s, 0)} | {cell(haps_s, 0)} | 1x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        write_section(args.results, "Baseline routing latency", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
