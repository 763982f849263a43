"""Episodes/s of lock-step episodes whose Student is an API at a fixed 200 ms per call: concurrency 1 vs 16.

    python -m benchmarks.api_engine                                  # 32 MMLU episodes, 200 ms per API call
    python -m benchmarks.api_engine --results benchmarks/RESULTS.md  # also write its section there

A mixed pool as in the paper's RQ6: the Student is a closed candidate behind an OpenAI-compatible endpoint on
127.0.0.1 (`haps_ray.engine.openai_server`, answering every request after a fixed latency with a deterministic
text and usage), reached through `ApiEngine` exactly as a provider would be; the Teacher is a local tiny
random-weight Llama engine. MMLU, max_rounds 2, greedy. The lock-step runner sends each step's Student calls as
one batch, which the API engine issues as concurrent requests, at most `api.max_concurrency` in flight: at 1 a
step costs (episodes x latency), at 16 about (episodes / 16 x latency). Both settings must give identical
trajectories with no failed call; the script checks that and reports episodes/s, API calls/s and the speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.results import write_section
from haps_ray.config import CandidateConfig, DecodingConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.engine.api import ApiEngine, ApiEngineClient, Secret
from haps_ray.engine.openai_server import ChatReply, OpenAIServer
from haps_ray.episodes import EpisodeRunner
from haps_ray.models import build_tiny_model
from haps_ray.rl.cost import PriceTable
from haps_ray.tasks import load_problems, make_episode

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mmlu_small.jsonl"
KEY = "benchmark-key"


class FixedLatency:
    """Answers after `latency_s`: a short solution naming a letter derived from the prompt, with usage."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s

    def complete(self, body: dict) -> ChatReply:
        time.sleep(self.latency_s)
        last = body["messages"][-1]["content"]
        letter = "ABCD"[hashlib.sha256(last.encode()).digest()[0] % 4]
        text = f"Solution: option {letter} fits best.\nAnswer: {letter}"
        return ChatReply(text, sum(len(m["content"]) for m in body["messages"]) // 4, len(text.split()))


def run(url: str, problems, concurrency: int, teacher: LLMEngine) -> tuple[list, dict]:
    candidate = CandidateConfig(name="api", model="loopback", open_source=False,
                                api={"base_url": url, "model": "fixed-latency", "api_key_env": "UNUSED",
                                     "max_concurrency": concurrency, "max_retries": 0})
    api = ApiEngine(candidate, Secret(KEY))
    task = TaskConfig(name="mmlu", max_rounds=2)
    runner = EpisodeRunner({"api": ApiEngineClient(api), "local": LocalEngineClient(teacher)},
                           DecodingConfig(max_new_tokens=8), PriceTable({"api": (0.1, 0.4), "local": (0.2, 0.2)}))
    episodes = [make_episode(task, p, {"teacher": "local", "student": "api"}) for p in problems]
    start = time.perf_counter()
    results = runner.run(episodes, seed=0)
    seconds = time.perf_counter() - start
    api_calls = sum(c.engine == "api" for r in results for c in r.calls)
    api.close()
    return results, {"concurrency": concurrency, "seconds": seconds, "episodes": len(results), "api_calls": api_calls,
                     "steps": runner.last_run.steps, "failed_calls": api.stats["failed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH"))
    parser.add_argument("--results", type=Path, help="write the '## API engine' section of this Markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    problems = load_problems("mmlu", str(FIXTURE))[0]
    problems = (problems * (args.episodes // len(problems) + 1))[: args.episodes]
    problems = [p.__class__(**{**p.__dict__, "id": f"{p.id}#{i}"}) for i, p in enumerate(problems)]
    teacher = LLMEngine(*build_tiny_model("llama"), name="local")
    server = OpenAIServer(FixedLatency(args.latency_ms / 1000), KEY, "fixed-latency").start()
    try:
        runs = [run(server.url, problems, c, teacher) for c in args.concurrency]
    finally:
        server.stop()
    (low_results, low), (high_results, high) = runs
    same = [r.to_dict() for r in low_results] == [r.to_dict() for r in high_results]
    if not same or low["failed_calls"] or high["failed_calls"]:
        print(f"FAILED: identical={same}, failed calls {low['failed_calls']} / {high['failed_calls']}", file=sys.stderr)
        return 1
    speedup = low["seconds"] / high["seconds"]
    lines = [
        "## API engine",
        "",
        f"Lock-step MMLU episodes (max_rounds 2, greedy) with the Student on an OpenAI-compatible loopback API answering "
        f"after a fixed {args.latency_ms:.0f} ms per call and the Teacher on a local tiny Llama engine; "
        f"`python -m benchmarks.api_engine` (`ApiEngine`, requests concurrent up to `api.max_concurrency`). "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other work.",
        "",
        "| api.max_concurrency | episodes | steps | API calls | seconds | episodes/s | API calls/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (low, high):
        lines.append(f"| {r['concurrency']} | {r['episodes']} | {r['steps']} | {r['api_calls']} | {r['seconds']:.2f} | "
                     f"{r['episodes'] / r['seconds']:.2f} | {r['api_calls'] / r['seconds']:.1f} |")
    lines += ["", f"Speed-up {high['concurrency']} vs {low['concurrency']}: **{speedup:.2f}x** (target >= 8x); "
              f"trajectories identical in both runs, no failed call. The remainder to {high['concurrency']}x is the "
              "Teacher's local decoding and steps whose Student calls number fewer than the concurrency.", ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        write_section(args.results, "API engine", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
