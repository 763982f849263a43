"""Peak memory of the two gradient paths that need token log-probs, before vs after the one log-prob helper.

    python -m benchmarks.logprob_memory                          # before = git ref 4767535, CPU
    python -m benchmarks.logprob_memory --before <ref> --device cuda --results benchmarks/RESULTS.md

A tiny random Llama (2 layers, d=64) with a 128k vocabulary (Llama-3's 128256), so the vocabulary dominates:
- `adapter_grads`: batch 32, prompts of ~20 tokens, completions of 256 tokens (257 positions get logits);
- router scoring: log π(z|x) with gradients for 32 routing prompts over 2 candidates x 2 roles, then backward.
"Before" runs the same measurement on the tree at git ref `--before` (checked out into a temporary worktree, the
code before `haps_ray.engine.logprobs`); "after" on this tree. Each measurement runs in its own process; on CPU the
figure is the peak resident memory above the process's memory just before the call (ru_maxrss), on CUDA the peak
allocated. Both runs save their outputs, and the script checks that gradients and log-probs agree to 1e-5 of each
tensor's largest value (the router's log π comes from sums of ~14 token log-probs near -12 each, so fp32 rounding of
those sums alone is ~1e-5 in absolute terms; both differences are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "4767535"  # the last commit with full-vocabulary log-softmax in engine and router
VOCAB, BATCH, COMPLETION, TOL = 128256, 32, 256, 1e-5


def tiny_128k(device: str):
    """(model, tokenizer): a random 2-layer Llama with a 128k vocabulary and the tiny builder's chat tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from haps_ray.models import build_tiny_model

    _, tokenizer = build_tiny_model("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).to(device).eval(), tokenizer


def current_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_adapter_grads(device: str, out: Path) -> dict:
    import torch

    from haps_ray.engine import LLMEngine
    from haps_ray.lora import Adapter

    model, tokenizer = tiny_128k(device)
    engine = LLMEngine(model, tokenizer, name="tiny128k", lora_layers=1, max_batch_size=BATCH, prefix_cache_mb=0)
    g = torch.Generator().manual_seed(1)
    messages = [[{"role": "user", "content": f"Question {i}: which option is right?"}] for i in range(BATCH)]
    completions = [torch.randint(0, VOCAB, (COMPLETION,), generator=g).tolist() for _ in range(BATCH)]
    adapters = [Adapter(torch.randn(1, 8, 64, generator=g) / 8, torch.randn(1, 64, 8, generator=g), 0.5) for _ in range(BATCH)]
    weights = [float(w) for w in torch.randn(BATCH, generator=g)]
    before = current_bytes(device)
    started = time.perf_counter()
    grads = engine.adapter_grads(messages, completions, adapters, weights)
    seconds = time.perf_counter() - started
    peak = peak_bytes(device) - before
    torch.save([(a.cpu(), b.cpu()) for a, b in grads], out)
    return {"peak_bytes": peak, "seconds": seconds}


def measure_router(device: str, out: Path) -> dict:
    import torch

    from haps_ray.routing import HighLevelRouter, RoutingSpec

    model, tokenizer = tiny_128k(device)
    model.requires_grad_(True)
    spec = RoutingSpec("mmlu", ("teacher", "student"), ("small", "large"))
    router = HighLevelRouter(model, tokenizer, spec, max_prompt_tokens=512)
    problems = [f"Question {i}: " + "which of the following statements about the topic is correct? " * 4 for i in range(BATCH)]
    zs = [spec.assignments()[i % spec.num_assignments] for i in range(BATCH)]
    before = current_bytes(device)
    started = time.perf_counter()
    log_probs = router.log_prob(problems, zs)
    log_probs.sum().backward()
    seconds = time.perf_counter() - started
    peak = peak_bytes(device) - before
    torch.save({"log_probs": log_probs.detach().cpu(), "embed_grad": model.get_input_embeddings().weight.grad.cpu()}, out)
    return {"peak_bytes": peak, "seconds": seconds}


WORKERS = {"adapter_grads": measure_adapter_grads, "router": measure_router}


def run_worker(tree: Path, which: str, device: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", which, "--device", device,
                           "--out", str(out)], env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{which} on {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def differences(before: Path, after: Path, which: str) -> tuple[float, float]:
    """(max abs difference, max abs difference / largest |value|) over every saved tensor, the worst tensor counting."""
    import torch

    a, b = torch.load(before), torch.load(after)
    pairs = ([(x, y) for (xa, xb), (ya, yb) in zip(a, b) for x, y in ((xa, ya), (xb, yb))] if which == "adapter_grads"
             else [(a[k], b[k]) for k in a])
    absolute = [float((x - y).abs().max()) for x, y in pairs]
    return max(absolute), max(d / float(x.abs().max()) for d, (x, _) in zip(absolute, pairs))


def section(rows: list[dict], args: argparse.Namespace) -> str:
    lines = ["## Token log-prob memory", "",
             f"`python -m benchmarks.logprob_memory --before {args.before} --device {args.device}` — tiny random Llama "
             f"(2 layers, d=64) with a {VOCAB}-token vocabulary, batch {BATCH}; adapter_grads with {COMPLETION}-token "
             f"completions, router log π(z|x) + backward over 2 x 2 assignments; {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, measured {time.strftime('%Y-%m-%d')}. Peak = "
             + ("peak allocated CUDA memory" if args.device.startswith("cuda") else
                "peak resident memory above the process's memory before the call") + ".", "",
             "| call | peak before | peak after | lower by | seconds before / after | max abs difference | relative to the largest value |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r['before'] / 2**20:.0f} MiB | {r['after'] / 2**20:.0f} MiB | "
                     f"**{r['before'] / r['after']:.1f}x** | {r['seconds_before']:.1f} / {r['seconds_after']:.1f} | "
                     f"{r['absolute']:.1e} | {r['relative']:.1e} |")
    lines += ["", "Target: at least 4x lower peak, same values to 1e-5 (relative to the largest value of each tensor).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global BATCH, COMPLETION  # a --worker run may resize the workload the measurement functions read
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE_REF, help="git ref of the code to compare against")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default="", help="Markdown file whose '## Token log-prob memory' section is written")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="with --worker only: a smaller batch for a quick check (the comparison uses the default)")
    parser.add_argument("--completion", type=int, default=COMPLETION,
                        help="with --worker only: shorter completions for a quick check (the comparison uses the default)")
    args = parser.parse_args(argv)
    if (args.batch, args.completion) != (BATCH, COMPLETION) and not args.worker:
        parser.error("--batch / --completion size a single --worker run; the before/after comparison uses the defaults")
    if args.worker:
        BATCH, COMPLETION = args.batch, args.completion
        print(json.dumps(WORKERS[args.worker](args.device, Path(args.out))))
        return 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for which in WORKERS:
                old = run_worker(before_tree, which, args.device, Path(tmp) / f"{which}.before.pt")
                new = run_worker(ROOT, which, args.device, Path(tmp) / f"{which}.after.pt")
                absolute, relative = differences(Path(tmp) / f"{which}.before.pt", Path(tmp) / f"{which}.after.pt", which)
                failed |= relative > TOL
                rows.append({"call": which, "before": old["peak_bytes"], "after": new["peak_bytes"],
                             "seconds_before": old["seconds"], "seconds_after": new["seconds"], "absolute": absolute,
                             "relative": relative})
                print(f"{which}: peak {old['peak_bytes'] / 2**20:.0f} MiB -> {new['peak_bytes'] / 2**20:.0f} MiB "
                      f"({old['peak_bytes'] / new['peak_bytes']:.1f}x lower), {old['seconds']:.1f} s -> {new['seconds']:.1f} s, "
                      f"max difference {absolute:.1e} ({relative:.1e} of the largest value)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
    if args.results:
        from benchmarks.results import write_section  # not at the top: the worker runs on another tree's sys.path

        write_section(Path(args.results), "Token log-prob memory", section(rows, args))
        print(f"wrote the Token log-prob memory section of {args.results}")
    if failed:
        print(f"values differ by more than {TOL} of their largest value", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
