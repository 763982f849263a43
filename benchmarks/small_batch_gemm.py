"""How fast this machine's BLAS multiplies a few rows by weights that do not fit in cache, in two orientations.

    python -m benchmarks.small_batch_gemm

A decode step multiplies M hidden states (M = rows still decoding) by every weight of the model once, so at small
M it streams the weights from memory. This script streams the decoder weights of 30 SmolLM2-135M layers (fp32,
distinct tensors, about 400 MB) and the 49152 x 576 vocabulary head through `F.linear(x, W)` (x·Wᵀ, what
transformers runs) and through the same product computed as (W·xᵀ)ᵀ, and prints ms per pass and the GB/s of
weights read, per M. It explains how the one-at-a-time baseline of `benchmarks.episodes` (M = 1) and the tail of a
lock-step generate (M of a few) run on this machine's BLAS; it changes nothing in the engine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
HEAD_SHAPE = (49152, 576)


def per_pass_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    layer_weights = [torch.randn(shape, generator=generator) for _ in range(args.layers) for shape in LAYER_SHAPES]
    head = torch.randn(HEAD_SHAPE, generator=generator)
    print(f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per pass (GB/s of weights read)")
    for name, weights in (("decoder layers", layer_weights), ("vocabulary head", [head])):
        gigabytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
        print(f"{name}: {len(weights)} weights, {gigabytes:.2f} GB")
        for m in args.rows:
            x = torch.randn(m, HEAD_SHAPE[1] if name == "vocabulary head" else 1536, generator=generator)
            inputs = {w.shape[1]: x[:, : w.shape[1]].contiguous() for w in weights}
            linear = per_pass_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], args.repeats)
            flipped = per_pass_ms(lambda: [torch.mm(w, inputs[w.shape[1]].t()).t() for w in weights], args.repeats)
            print(f"  M={m:3d}: x·Wᵀ {linear:8.2f} ms ({gigabytes / linear * 1e3:5.1f} GB/s)   "
                  f"(W·xᵀ)ᵀ {flipped:8.2f} ms ({gigabytes / flipped * 1e3:5.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
