"""Decode throughput of per-sample LoRA by batched matmul vs no adapter vs peft (mixed batch, per-request switching).

Every method decodes the same random prompts with the same random-weight model (weights shared, never copied):

    no adapter            HF `generate`, plain model
    bmm k=1 / k=all       HF `generate` inside `haps_ray.lora.use_adapters`, a different adapter per sample
    peft mixed batch      HF `generate(adapter_names=[...])`, peft 0.21, a different adapter per sample (o_proj, k=1)
    peft per-request      one request at a time: `set_adapter(name)` then batch-1 `generate` (o_proj, k=1)
    engine loop (+bmm)    `LLMEngine.generator.generate` (our decode loop), no adapter and bmm k=1

Every request decodes exactly `new` tokens (EOS suppressed); tokens/s counts generated tokens over the whole call
(prefill included). Methods run interleaved, one repeat after another, after `--warmup` untimed rounds; the table
reports the median. Per-request switching is timed on the first `--switch-requests` requests of the batch (tokens/s
over those), since it is one `generate` per request.

Clock: on CUDA, wall time (synchronised). On CPU the default is the process's CPU time with one torch thread:
on a shared machine (other jobs on the same cores) wall time swings by 2x between runs while CPU time of a
single-threaded process stays put, so ratios measured with it are meaningful; `--clock wall` gives wall time.

    python benchmarks/lora_overhead.py --preset cpu-small          # ~SmolLM2-135M shape, CPU, fp32
    python benchmarks/lora_overhead.py --preset llama8b            # Llama-3.1-8B shape, GPU, bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from haps_ray.lora import Adapter, attach_lora, use_adapters


@dataclass
class Preset:
    config: dict
    dtype: torch.dtype
    device: str
    batch: int
    prompt: int
    new: int
    repeats: int
    warmup: int


PRESETS = {
    # SmolLM2-135M shape (Llama architecture), random weights
    "cpu-small": Preset(
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        torch.float32, "cpu", batch=32, prompt=64, new=32, repeats=3, warmup=0,
    ),
    # a tiny model for a smoke run of this script
    "tiny": Preset(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152),
        torch.float32, "cpu", batch=8, prompt=16, new=8, repeats=2, warmup=1,
    ),
    # Llama-3.1-8B shape, random bf16 weights
    "llama8b": Preset(
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
        torch.bfloat16, "cuda", batch=32, prompt=256, new=128, repeats=5, warmup=1,
    ),
}


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the *same* parameter tensors (wrappers may differ, weights are one copy)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def random_adapters(n: int, k: int, rank: int, hidden: int, seed: int) -> list[Adapter]:
    g = torch.Generator().manual_seed(seed)
    return [Adapter(torch.randn(k, rank, hidden, generator=g) / hidden**0.5, torch.randn(k, hidden, rank, generator=g) * 0.01, 1.0)
            for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(preset: Preset, device: str) -> torch.nn.Module:
    config = LlamaConfig(max_position_embeddings=4096, **preset.config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=preset.dtype)
    return model.eval().requires_grad_(False)


def methods(model: torch.nn.Module, preset: Preset, device: str, switch_requests: int) -> dict[str, Callable[[], int]]:
    """name -> a callable decoding the workload and returning the number of tokens it produced."""
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (preset.batch, preset.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    settings = dict(max_new_tokens=preset.new, min_new_tokens=preset.new, do_sample=False, pad_token_id=0, eos_token_id=None)

    def hf(m: torch.nn.Module, **extra) -> Callable[[], int]:
        def run() -> int:
            with torch.inference_mode():
                out = m.generate(input_ids=ids, attention_mask=mask, **settings, **extra)
            return (out.shape[1] - ids.shape[1]) * out.shape[0]
        return run

    def with_adapters(m: torch.nn.Module, adapters: list[Adapter]) -> Callable[[], int]:
        inner = hf(m)

        def run() -> int:
            with use_adapters(m, adapters):
                return inner()
        return run

    k1, kall = shared_copy(model), shared_copy(model)
    attach_lora(k1, 1)
    attach_lora(kall, layers)
    ad1 = random_adapters(preset.batch, 1, 8, hidden, seed=1)
    adall = random_adapters(preset.batch, layers, 8, hidden, seed=2)

    names = [f"a{i}" for i in range(preset.batch)]
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=[layers - 1], init_lora_weights=False)
    peft_model = get_peft_model(shared_copy(model), lora, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    peft_model.to(device=device, dtype=preset.dtype).eval()

    def per_request() -> int:
        produced = 0
        with torch.inference_mode():
            for i in range(min(switch_requests, preset.batch)):
                peft_model.set_adapter(names[i])
                out = peft_model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **settings)
                produced += out.shape[1] - ids.shape[1]
        return produced

    table = {
        "no adapter": hf(model),
        "bmm k=1": with_adapters(k1, ad1),
        f"bmm k=all ({layers})": with_adapters(kall, adall),
        "peft mixed batch": hf(peft_model, adapter_names=names),
        "peft per-request": per_request,
    }
    table.update(engine_methods(shared_copy(model), ids, ad1, preset))
    return table


def engine_methods(model: torch.nn.Module, ids: torch.Tensor, adapters: list[Adapter], preset: Preset) -> dict[str, Callable[[], int]]:
    """Our own decode loop; needs the SmolLM2 tokenizer (offline pack) for EOS/pad/decoding, skipped without it."""
    from haps_ray.engine import LLMEngine

    try:
        from transformers import AutoTokenizer

        from haps_ray import packs

        tokenizer = AutoTokenizer.from_pretrained(packs.pack_tokenizer_dir(packs.PACKS["smollm2-135m-instruct"], packs.cache_root()))
    except Exception as err:  # the pack is optional for this script; say why the rows are missing
        print(f"(engine-loop rows skipped: no SmolLM2 tokenizer: {err})")
        return {}
    engine = LLMEngine(model, tokenizer, name="bench", lora_layers=1, max_batch_size=preset.batch)
    engine.encoder.eos_ids = set()  # decode exactly `new` tokens per request, like the HF rows (min_new_tokens)
    prompts = ids.tolist()

    def run(with_adapters: bool) -> Callable[[], int]:
        return lambda: sum(g.n_output_tokens for g in engine.generator.generate(
            prompts, adapters if with_adapters else [None] * len(prompts), max_new_tokens=preset.new))

    return {"engine loop": run(False), "engine loop + bmm k=1": run(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default: the preset's)")
    parser.add_argument("--switch-requests", type=int, default=8, help="requests timed for peft per-request switching")
    parser.add_argument("--device", default=None, help="override the preset's device")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: the preset's)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto", help="auto: wall on CUDA, CPU time on CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU clock needs 1 to mean tokens/s)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = args.device or preset.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} needs a CUDA GPU (none visible); use --preset cpu-small")
    repeats = args.repeats or preset.repeats
    warmup = preset.warmup if args.warmup is None else args.warmup
    clock_name = args.clock if args.clock != "auto" else ("wall" if device.startswith("cuda") else "cpu")
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(preset, device)
    table = methods(model, preset, device, args.switch_requests)
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    print(f"preset={args.preset} batch={preset.batch} prompt={preset.prompt} new={preset.new} dtype={preset.dtype} "
          f"repeats={repeats} warmup={warmup} clock={clock_name} | {machine} | torch {torch.__version__}")
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(warmup):
        for run in table.values():
            run()
    for repeat in range(repeats):
        for name, run in table.items():
            sync(device)
            start = clock()
            tokens = run()
            sync(device)
            samples[name].append(tokens / (clock() - start))
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in samples.items()), flush=True)
    speed = {name: statistics.median(values) for name, values in samples.items()}
    base = speed["no adapter"]
    print(f"{'method':<26}{'tok/s (median)':>16}{'min':>10}{'max':>10}{'vs no adapter':>15}")
    for name, value in speed.items():
        print(f"{name:<26}{value:>16.1f}{min(samples[name]):>10.1f}{max(samples[name]):>10.1f}{value / base:>14.2f}x")
    bmm = speed["bmm k=1"]
    checks = [
        ("bmm k=1 / no adapter", bmm / base, 0.95),
        ("bmm k=1 / peft mixed batch", bmm / speed["peft mixed batch"], 1.3),
        ("bmm k=1 / peft per-request", bmm / speed["peft per-request"], 20.0),
    ]
    for label, ratio, target in checks:
        print(f"{label:<30}{ratio:>8.2f}x   target >= {target}x: {'met' if ratio >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
