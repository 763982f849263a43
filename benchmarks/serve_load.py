"""Load on the HAPS Serve app: 1, 4 and 16 concurrent clients, each for a fixed time.

    python -m benchmarks.serve_load                                   # demo config (offline packs), fresh policy, CPU
    python -m benchmarks.serve_load --policy runs/demo_mmlu_offline/rl/best --duration 60
    python -m benchmarks.serve_load --config tests/fixtures/run_tiny.yaml --duration 10      # tiny models: seconds
    python -m benchmarks.serve_load --device cuda                     # a GPU machine: engines and router on cuda
    python -m benchmarks.serve_load --results benchmarks/RESULTS.md   # also write its section there

Each client sends `model: "haps"` chat completions (MMLU fixture problems, round robin) back to back through the
`openai` client for `--duration` seconds; the script reports requests/s, p50/p95 latency, errors and the engines'
mean batch size over that level (from GET /v1/stats). Without `--policy` a freshly initialised policy of the config
is saved and served: throughput does not depend on what the weights are. Target on the CPU box: 16 clients at
least 3x the requests/s of 1 client, with 0 errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
import ray
import torch

from benchmarks.results import write_section
from haps_ray.config import load_config
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import load_problems
from pipelines import serve as serve_pipeline

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mmlu_small.jsonl"


def batch_totals(url: str) -> tuple[int, int, int, int]:
    """(engine batches, engine samples, router batches, router samples) so far, from GET /v1/stats."""
    stats = json.loads(urllib.request.urlopen(f"{url}/stats", timeout=60).read())
    engines = stats["engines"].values()
    return (sum(e["batches"] for e in engines), sum(e["samples"] for e in engines),
            stats["router"]["batches"], stats["router"]["samples"])


def run_level(url: str, clients: int, duration: float, problems: list) -> dict:
    """`clients` threads sending requests back to back for `duration` seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    deadline = time.perf_counter() + duration

    def loop(index: int) -> None:
        i = index
        while time.perf_counter() < deadline:
            p = problems[i % len(problems)]
            i += clients
            started = time.perf_counter()
            try:
                client.chat.completions.create(model="haps", messages=[{"role": "user", "content": p.question}],
                                               extra_body={"haps": {"choices": p.choices, "subject": p.subject}})
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as err:  # counted and reported: the target is 0
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")

    before = batch_totals(url)
    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started  # the last requests finish after the deadline: count their time too
    after = batch_totals(url)
    batches, samples, router_batches, router_samples = (a - b for a, b in zip(after, before))
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
        "rps": len(latencies) / wall, "p50_s": statistics.median(ordered) if ordered else float("nan"),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan"),
        "mean_batch": samples / max(batches, 1), "mean_router_batch": router_samples / max(router_batches, 1),
        "first_error": errors[0] if errors else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tune_configs" / "demo_mmlu_offline.yaml"))
    parser.add_argument("--policy", default="", help="Policy directory; default: a fresh policy of the config.")
    parser.add_argument("--clients", default="1,4,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds per level.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray.")
    parser.add_argument("--results", type=Path, default=None, help="Write the section into this RESULTS.md.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"serve.port={args.port}", f"router.device={args.device}", "serve.router_num_cpus=0",
                 "serve.max_batch_size=16", "serve.max_ongoing_requests=32"]
    cfg = load_config(args.config, overrides=overrides)
    for c in cfg.candidates:
        c.device = args.device
        if args.device == "cuda":  # the engines and the router share the one GPU
            c.num_gpus = 1.0 / (len(cfg.candidates) + 1)
    if args.device == "cuda":
        cfg.serve.router_num_gpus = 1.0 / (len(cfg.candidates) + 1)
    problems, _ = load_problems("mmlu", str(FIXTURE))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy
        if not policy:
            torch.manual_seed(cfg.seed)
            policy = str(Path(tmp) / "policy")
            HAPSPolicy.from_config(cfg).save(policy)
        started = time.perf_counter()
        url = serve_pipeline.start(cfg, policy)
        startup = time.perf_counter() - started
        run_level(url, 1, min(args.duration, 5.0), problems)  # warm-up: first calls, lazy context lookups
        rows = [run_level(url, int(n), args.duration, problems) for n in args.clients.split(",")]
        serve_pipeline.stop()
    ray.shutdown()
    base = rows[0]["rps"]
    lines = [
        "## Serve load",
        "",
        f"`python -m benchmarks.serve_load --config {Path(args.config).name} --duration {args.duration:g} "
        f"--device {args.device}` ({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, "
        f"{args.num_cpus}-CPU local Ray; policy: {'given' if args.policy else 'fresh, untrained'}; app start "
        f"{startup:.0f} s). Each client sends MMLU `model: \"haps\"` requests back to back; mean batch = samples per "
        "engine generate call over the level.",
        "",
        "| clients | requests | errors | requests/s | vs 1 client | p50 s | p95 s | mean engine batch | mean router batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | {r['rps'] / base:.2f}x | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['mean_batch']:.2f} | {r['mean_router_batch']:.2f} |")
    errors = [r["first_error"] for r in rows if r["first_error"]]
    if errors:
        lines += ["", f"First error: {errors[0][:300]}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        write_section(args.results, "Serve load", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
