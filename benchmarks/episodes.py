"""Episodes/s of the lock-step runner against running the same episodes one at a time.

    python -m benchmarks.episodes                        # 16 MMLU problems, offline SmolLM2, greedy
    python -m benchmarks.episodes --repeats 2 --results benchmarks/RESULTS.md

Both modes run identical greedy episodes (SmolLM2-135M-Instruct as Teacher and Student, max_rounds 3) on
the same engine; lock-step advances all of them together, so each step is one batched generate, while the
baseline runs each episode alone (one sample per generate). Both modes use the engine's prefix cache, emptied
before each. The trajectories must come out identical; the script checks that (and that no episode failed) and
reports episodes/s, generated tokens/s, generate calls and prompt tokens prefilled / taken from the cache. On a shared
machine wall time depends on what else runs, so episodes per CPU-second of this process are reported too
(use --threads 1 there: with more torch threads than free cores, CPU time counts spinning threads).
With `--repeats N` each mode runs N times, alternating which goes first (L A, A L, ...) so that a drift in the
machine's speed hits both; the table reports each mode's rates over all its runs together, its mean run and every
run's wall time, and the speed-up is the ratio of those rates (of the total times). With `--results`, the
"## Episodes" section of that Markdown file is written (replaced if present, appended otherwise); the rest of the
file is left as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.results import write_section
from haps_ray.config import DecodingConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.episodes import EpisodeResult, EpisodeRunner
from haps_ray.models import load_model
from haps_ray.rl.cost import PriceTable
from haps_ray.tasks import load_problems, make_episode, sample_problems

ROOT = Path(__file__).resolve().parents[1]
SHARED_VALID = ROOT.parent / "shared" / "data" / "mmlu" / "valid.jsonl"
FIXTURE = ROOT / "tests" / "fixtures" / "mmlu_small.jsonl"
MODEL = "smollm2-135m-instruct"


def run_mode(engine: LLMEngine, problems, task: TaskConfig, decoding: DecodingConfig,
             lock_step: bool) -> tuple[list[EpisodeResult], dict]:
    """Results and measurements of one mode: wall and CPU seconds of this process, generate calls, and the
    prompt tokens prefilled and taken from the engine's prefix cache (which starts empty)."""
    z = {"teacher": engine.name, "student": engine.name}
    prices = PriceTable({engine.name: (0.2, 0.2)})
    episodes = [make_episode(task, p, z) for p in problems]
    runner = EpisodeRunner({engine.name: LocalEngineClient(engine)}, decoding, prices)
    engine.clear_prefix_cache()  # each mode starts cold: the other mode's prompts would all be cached
    prefilled, reused = engine.prefill_tokens, engine.reused_tokens
    start, cpu_start = time.perf_counter(), time.process_time()
    if lock_step:
        results = runner.run(episodes)
    else:
        results = [runner.run([ep])[0] for ep in episodes]
    return results, {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu_start,
                     "generate_calls": runner.generate_calls, "prefilled": engine.prefill_tokens - prefilled,
                     "reused": engine.reused_tokens - reused}


def aggregate(runs: list[dict], n: int) -> dict:
    """One mode's runs (of n episodes each) as one row: rates over all runs together (episodes, tokens and seconds
    summed), seconds as the mean run, the counts of the first run (every run makes the same calls), and every
    run's wall time."""
    seconds, cpu, tokens = (sum(r[key] for r in runs) for key in ("seconds", "cpu", "tokens"))
    return {**runs[0], "eps": n * len(runs) / seconds, "eps_cpu": n * len(runs) / cpu, "tok_s": tokens / seconds,
            "seconds": seconds / len(runs), "cpu": cpu / len(runs), "runs": [r["seconds"] for r in runs]}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU"


def engine_flags(args: argparse.Namespace) -> str:
    flags = f" --prefix-cache-mb {args.prefix_cache_mb}" if args.prefix_cache_mb != 1024 else ""
    return flags + (" --no-ragged" if args.no_ragged else "")


def section_markdown(rows: list[dict], n: int, source: str, args: argparse.Namespace, same: int) -> str:
    lock, alone = rows
    speedup = lock["eps"] / alone["eps"]
    lines = [
        "## Episodes",
        "",
        f"`python -m benchmarks.episodes --repeats {args.repeats}{engine_flags(args)}` — {n} MMLU problems ({source}), "
        f"{MODEL} (fp32, {args.device}) "
        f"as both Teacher and Student, greedy, max_new_tokens={args.max_new_tokens}, max_rounds={args.rounds}; "
        f"{device_name(args.device)}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"measured {time.strftime('%Y-%m-%d')}. Each mode ran {args.repeats} time(s), alternating which went first; "
        "rates are over all runs of a mode, seconds are its mean run.",
        "",
        "| mode | episodes/s (wall) | episodes per CPU-s | generated tok/s | generate calls | LLM calls | "
        "prompt tokens prefilled / from prefix cache | wall s | CPU s | wall s of every run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['eps']:.4f} | {row['eps_cpu']:.4f} | {row['tok_s']:.1f} | "
                     f"{row['generate_calls']} | {row['llm_calls']} | {row['prefilled']} / {row['reused']} | "
                     f"{row['seconds']:.0f} | {row['cpu']:.0f} | {', '.join(f'{w:.0f}' for w in row['runs'])} |")
    lines += ["", f"Lock-step speed-up (over all runs): **{speedup:.2f}x** wall, "
              f"**{lock['eps_cpu'] / alone['eps_cpu']:.2f}x** per CPU-second (target >= 3x); per pair of runs: "
              f"{', '.join(f'{a / b:.2f}x' for a, b in zip(alone['runs'], lock['runs']))}. "
              f"Identical trajectories in every run: {same}/{n} episodes.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="MMLU problems (episodes per mode).")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Per call (offline configs: 128).")
    parser.add_argument("--rounds", type=int, default=3, help="MMLU max_rounds.")
    parser.add_argument("--data", default=str(SHARED_VALID if SHARED_VALID.is_file() else FIXTURE))
    parser.add_argument("--device", default="cpu", help="Where the engine runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each mode, alternating which goes first; rates are over all runs.")
    parser.add_argument("--results", default="", help="Markdown file whose '## Episodes' section is (re)written.")
    parser.add_argument("--prefix-cache-mb", type=int, default=1024, help="The engine's prefix cache (0 = off).")
    parser.add_argument("--no-ragged", action="store_true", help="Decode with plain SDPA over the padded batch.")
    parser.add_argument("--lock-step-only", action="store_true",
                        help="Time lock-step alone (to compare engine switches); no speed-up, no --results section.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    problems, _ = load_problems("mmlu", args.data)
    problems = sample_problems(problems, args.n, seed=0, stratify=True)
    model, tokenizer = load_model(MODEL, dtype="float32", device=args.device)
    engine = LLMEngine(model, tokenizer, name="smollm2", max_batch_size=max(32, args.n),
                       prefix_cache_mb=args.prefix_cache_mb, ragged_attention=not args.no_ragged)
    task = TaskConfig(name="mmlu", max_rounds=args.rounds)
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    run_mode(engine, problems[:1], TaskConfig(name="mmlu", max_rounds=1), DecodingConfig(max_new_tokens=4), True)  # warm-up

    runs: dict[str, list[dict]] = {"lock-step": []} if args.lock_step_only else {"lock-step": [], "one at a time": []}
    first: list | None = None
    same = len(problems)
    for repeat in range(args.repeats):
        modes = [("lock-step", True)] if args.lock_step_only else [("lock-step", True), ("one at a time", False)]
        for mode, lock_step in modes if repeat % 2 == 0 else modes[::-1]:
            results, measured = run_mode(engine, problems, task, decoding, lock_step)
            failed = [r for r in results if r.error]
            if failed:
                print(f"{mode}: {len(failed)}/{len(results)} episodes failed, first: {failed[0].error}", file=sys.stderr)
                return 1
            tokens = sum(c.n_output_tokens for r in results for c in r.calls)
            seconds, cpu = measured["seconds"], measured["cpu"]
            runs[mode].append({"mode": mode, "tokens": tokens, "llm_calls": sum(r.n_calls for r in results), **measured})
            trajectories = [[c.token_ids for c in r.calls] for r in results]
            first = first or trajectories
            same = min(same, sum(a == b for a, b in zip(first, trajectories)))
            print(f"{mode:>14}: {len(results) / seconds:.4f} episodes/s wall, {len(results) / cpu:.4f} per CPU-s, "
                  f"{tokens / seconds:.1f} tok/s, {measured['generate_calls']} generate calls, {seconds:.1f} s wall, "
                  f"{cpu:.1f} s CPU, prompt tokens prefilled {measured['prefilled']} / from prefix cache {measured['reused']}",
                  flush=True)
    rows = [aggregate(measured_runs, len(problems)) for measured_runs in runs.values()]
    if args.lock_step_only:
        print(f"lock-step{engine_flags(args)}: {rows[0]['eps']:.4f} episodes/s over {args.repeats} run(s), "
              f"wall s of every run {', '.join(f'{w:.0f}' for w in rows[0]['runs'])}")
        return 0
    source = "shared valid split" if Path(args.data) == SHARED_VALID else args.data
    print(f"speed-up {rows[0]['eps'] / rows[1]['eps']:.2f}x wall, {rows[0]['eps_cpu'] / rows[1]['eps_cpu']:.2f}x per CPU-s "
          f"(all runs); identical trajectories {same}/{len(problems)}")
    if args.results:
        write_section(Path(args.results), "Episodes", section_markdown(rows, len(problems), source, args, same))
        print(f"wrote the Episodes section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
