"""A Tune sweep with one shared engine pool vs one engine set per trial (the naive way): wall time and peak memory.

Both runs are the same 4-trial sweep (2 λ x 2 LoRA depths, `sweep.max_concurrent_trials` at once) started from the
same prepared run directory (D and the SFT router built once, untimed, then copied). Shared: the driver starts one
EngineActor per candidate, wrapping the deepest k, and every trial's rollouts use it. Naive: every trial starts its
own engines (wrapping its own k) inside its reservation. While a sweep runs, a sampler adds up every 0.2 s the
resident memory (RSS) of the live EngineActor processes and of the whole local Ray (driver + every process under it);
the table gives the peaks. RSS counts pages shared between processes (torch's libraries, Ray's object store) once per
process, the way an operator sees a node fill up.

    python benchmarks/tune_sharing.py                                  # tiny random-weight models (minutes)
    python benchmarks/tune_sharing.py --models offline                 # SmolLM2-135M + Qwen2.5-Coder-0.5B engines
    python benchmarks/tune_sharing.py --write                          # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import ray._private.state as ray_state

from benchmarks.results import write_section
from haps_ray.config import load_config
from pipelines import run, tune

ROOT = Path(__file__).resolve().parent.parent
PACKS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]  # --models offline


class MemorySampler:
    """Peak summed RSS of the EngineActor processes and of the driver's process tree while it runs."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.stop = every_s, threading.Event()
        self.engines_peak = self.total_peak = 0
        self.engines_most = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pids: list[int]) -> int:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:  # ended between listing and reading
                pass
        return total

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            engines = [a["Pid"] for a in ray_state.actors().values()
                       if a["ActorClassName"] == "EngineActor" and a["State"] == "ALIVE" and a["Pid"]]
            tree = [me.pid] + [p.pid for p in me.children(recursive=True)]
            self.engines_peak = max(self.engines_peak, self._rss(engines))
            self.engines_most = max(self.engines_most, len(engines))
            self.total_peak = max(self.total_peak, self._rss(tree))
            time.sleep(self.every_s)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def measure(cfg, prepared: Path, scratch: Path, share: bool) -> dict:
    run_dir = scratch / ("shared" if share else "naive")
    shutil.copytree(prepared, run_dir)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    started = time.perf_counter()
    with MemorySampler() as memory:
        result = tune.sweep(cfg, str(run_dir), share_engines=share)
    seconds = time.perf_counter() - started
    failed = [r for r in result["rows"] if r.status != "finished"]
    if failed:
        raise SystemExit(f"{'shared' if share else 'naive'} sweep: trials did not finish: {failed}")
    return {"mode": "shared pool" if share else "engines per trial", "seconds": seconds, "trials": len(result["rows"]),
            "engines_most": memory.engines_most, "engines_gib": memory.engines_peak / 2**30,
            "total_gib": memory.total_peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tests" / "fixtures" / "sweep_tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--models", choices=["tiny", "offline"], default="tiny",
                        help="offline: the engines are the SmolLM2-135M / Qwen2.5-Coder-0.5B packs (router stays tiny)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    if args.models == "offline":  # list items cannot be --set: swap the two candidates' weights here
        cfg = cfg.model_copy(update={"candidates": [c.model_copy(update={"model": m}) for c, m in zip(cfg.candidates, PACKS)]})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    scratch = Path(tempfile.mkdtemp(prefix="tune_sharing_"))
    try:
        prepared = scratch / "prepared"
        run.prepare(cfg.model_copy(update={"run_dir": str(prepared)}), str(prepared))  # D + SFT once, untimed
        rows = [measure(cfg, prepared, scratch, share=True), measure(cfg, prepared, scratch, share=False)]
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    shared, naive = rows
    machine = f"{platform.machine()} CPU x{os.cpu_count()}, {psutil.virtual_memory().total / 2**30:.0f} GiB, Ray {ray.__version__}"
    lines = [
        f"## Tune sweep: shared engine pool vs engines per trial ({args.models} engines)",
        "",
        f"`python benchmarks/tune_sharing.py --models {args.models}` ({machine}): the 4-trial sweep of "
        f"`{Path(args.config).name}` (2 λ x 2 k, {cfg.sweep.max_concurrent_trials or 'all'} trials at once), from one "
        "prepared D + SFT router. Peaks of summed RSS, sampled every 0.2 s.",
        "",
        "| engines | wall time s | most EngineActors alive | peak engine RSS GiB | peak total RSS GiB |",
        "|---|---|---|---|---|",
        *[f"| {r['mode']} | {r['seconds']:.1f} | {r['engines_most']} | {r['engines_gib']:.2f} | {r['total_gib']:.2f} |" for r in rows],
        "",
        f"Shared / naive: engine memory {shared['engines_gib'] / naive['engines_gib']:.2f}x, "
        f"total memory {shared['total_gib'] / naive['total_gib']:.2f}x, wall time {shared['seconds'] / naive['seconds']:.2f}x.",
        "Engines per trial peak at (trials at once) x (candidates) processes; the shared pool stays at one per candidate "
        "however many trials run, and no trial waits for engines to load. Target: shared at most 1/2 the engine memory, "
        "no more wall time.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", lines[0][3:], text)


if __name__ == "__main__":
    main()
