"""Per-sample LoRA on `self_attn.o_proj` of the last k decoder layers, applied by batched matmul.

Every sample i of a batch carries its own factors; a wrapped layer computes

    y_i = W x_i + alpha_i * B_i (A_i x_i)

with the frozen W shared by the whole batch and never copied, merged or swapped.

Factor naming follows peft, not the paper: A is the down-projection (r x d_in), B the up-projection
(d_out x r); the paper calls the d x r factor A and the r x d factor B. For one sample and a model with
k wrapped layers:

    Adapter.A: (k, r, d_in)    Adapter.B: (k, d_out, r)    layer 0 = the shallowest of the last k

A model wrapped at K layers also takes adapters of k < K layers (they go into its deepest k): one engine serves
every k of a sweep.

For Llama/Qwen2/Mistral d_in == d_out == hidden size; Gemma-style models may have d_in != d_out.

    layers = attach_lora(model, k=1)           # once; idempotent for the same k
    with use_adapters(model, [ad0, None, ad2]):  # None = no adapter for that sample (exactly the base)
        model.generate(...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Adapter:
    """LoRA factors of one sample for one model: A (k, r, d_in), B (k, d_out, r); ΔW_l = alpha · B[l] @ A[l]."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.A.dim() != 3 or self.B.dim() != 3:
            raise ValueError(f"Adapter factors must be 3-D (k, r, d_in) and (k, d_out, r); got A{tuple(self.A.shape)} B{tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[0] or self.A.shape[1] != self.B.shape[2]:
            raise ValueError(f"Adapter factors disagree on layers or rank: A{tuple(self.A.shape)} B{tuple(self.B.shape)}")

    @property
    def num_layers(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def detach(self) -> Adapter:
        return Adapter(self.A.detach(), self.B.detach(), self.alpha)

    def to(self, device: torch.device | str) -> Adapter:
        return Adapter(self.A.to(device), self.B.to(device), self.alpha)


class PerSampleLoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear`; adds alpha_i · B_i A_i x for each sample i while factors are set."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.A: torch.Tensor | None = None  # (batch, r, d_in)
        self.B: torch.Tensor | None = None  # (batch, d_out, r)
        self.alpha: torch.Tensor | None = None  # (batch, 1, 1)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def set_factors(self, A: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor) -> None:
        self.A, self.B, self.alpha = A, B, alpha

    def clear_factors(self) -> None:
        self.A = self.B = self.alpha = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the factors of batch rows `index` (a decode loop dropping finished samples)."""
        if self.A is not None:
            self.A, self.B, self.alpha = self.A[index], self.B[index], self.alpha[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.A is None:
            return y
        if x.shape[0] != self.A.shape[0]:
            raise ValueError(f"per-sample LoRA: input batch {x.shape[0]} != adapter batch {self.A.shape[0]}")
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # (b, t, d_in)
        h = torch.bmm(x3, self.A.to(x.dtype).transpose(1, 2))  # (b, t, r)
        delta = torch.bmm(h, self.B.to(x.dtype).transpose(1, 2))  # (b, t, d_out)
        return y + (self.alpha.to(x.dtype) * delta).reshape(*shape[:-1], -1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (Llama, Qwen2, Mistral, Gemma, ... : `model.model.layers`)."""
    for owner in (getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(f"{type(model).__name__}: cannot find decoder layers at model.model.layers")


def attach_lora(model: nn.Module, k: int) -> list[PerSampleLoRALinear]:
    """Wrap `self_attn.o_proj` of the last k decoder layers (idempotent); returns the wrappers, shallowest first."""
    layers = decoder_layers(model)
    if not 1 <= k <= len(layers):
        raise ValueError(f"lora_layers k={k} must be in [1, {len(layers)}] for {type(model).__name__}")
    existing = lora_layers(model)
    if existing:
        if len(existing) != k:
            raise ValueError(f"model already carries per-sample LoRA on {len(existing)} layers, asked for {k}")
        return existing
    wrapped = []
    for index in range(len(layers) - k, len(layers)):
        attn = getattr(layers[index], "self_attn", None)
        o_proj = getattr(attn, "o_proj", None)
        if not isinstance(o_proj, nn.Linear):
            raise ValueError(
                f"{type(model).__name__} layer {index}: attention has no nn.Linear `o_proj`; "
                "per-sample LoRA supports Llama/Qwen2/Mistral/Gemma-style attention"
            )
        wrapper = PerSampleLoRALinear(o_proj)
        attn.o_proj = wrapper
        wrapped.append(wrapper)
    return wrapped


def lora_layers(model: nn.Module) -> list[PerSampleLoRALinear]:
    """The wrappers attached by `attach_lora`, shallowest first (empty if none)."""
    return [m for m in model.modules() if isinstance(m, PerSampleLoRALinear)]


def adapter_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every wrapped layer: what a hypernetwork head must emit for this model."""
    return [(layer.in_features, layer.out_features) for layer in lora_layers(model)]


def stack_adapters(
    adapters: Sequence[Adapter | None], layers: Sequence[PerSampleLoRALinear], device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """Per wrapped layer, batched (A, B, alpha); a `None` sample gets zero factors (its output is exactly the base).

    Adapters of different ranks are zero-padded to the largest rank, which leaves every product unchanged. An adapter
    with fewer layers than the model has wrapped (a k=1 adapter on an engine wrapped at the sweep's deepest k=4) goes
    into the deepest of them, the same layers an engine wrapped at exactly its k would use; the shallower wrapped
    layers get zero factors for that sample, so its output equals that engine's. Returns None when no sample has an
    adapter. Gradients flow back into every given factor tensor.
    """
    present = [a for a in adapters if a is not None]
    if not present:
        return None
    k = len(layers)
    for i, ad in enumerate(adapters):
        if ad is None:
            continue
        if ad.num_layers > k:
            raise ValueError(f"adapter {i} has {ad.num_layers} layers, model has only {k} wrapped layers")
        offset = k - ad.num_layers
        for l in range(ad.num_layers):
            layer = layers[offset + l]
            if ad.A.shape[2] != layer.in_features or ad.B.shape[1] != layer.out_features:
                raise ValueError(
                    f"adapter {i} layer {l}: A{tuple(ad.A.shape)} B{tuple(ad.B.shape)} do not fit o_proj "
                    f"({layer.in_features} -> {layer.out_features})"
                )
    rank = max(a.rank for a in present)
    dtype = present[0].A.dtype  # one dtype for the stacked batch; the layer casts to the activations' dtype
    alpha = torch.tensor([a.alpha if a is not None else 0.0 for a in adapters], device=device).view(-1, 1, 1)
    stacked = []
    for l, layer in enumerate(layers):
        As, Bs = [], []
        for ad in adapters:
            if ad is None or l < k - ad.num_layers:  # no adapter, or one for deeper layers only
                As.append(torch.zeros(rank, layer.in_features, device=device, dtype=dtype))
                Bs.append(torch.zeros(layer.out_features, rank, device=device, dtype=dtype))
                continue
            own = l - (k - ad.num_layers)  # the adapter's own layer index (0 = its shallowest)
            a, b = ad.A[own].to(device=device, dtype=dtype), ad.B[own].to(device=device, dtype=dtype)
            if ad.rank < rank:
                a = torch.cat([a, a.new_zeros(rank - ad.rank, a.shape[1])], dim=0)
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - ad.rank)], dim=1)
            As.append(a)
            Bs.append(b)
        stacked.append((torch.stack(As), torch.stack(Bs), alpha))
    return stacked


def select_adapter_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Inside `use_adapters`: keep only batch rows `index` on every wrapped layer (rows kept in that order)."""
    for layer in lora_layers(model):
        layer.select_rows(index)


@contextmanager
def use_adapters(model: nn.Module, adapters: Sequence[Adapter | None] | None) -> Iterator[None]:
    """Set per-sample factors on every wrapped layer for the duration of the block, then clear them."""
    layers = lora_layers(model)
    if adapters is not None and any(a is not None for a in adapters) and not layers:
        raise ValueError("adapters given but the model has no per-sample LoRA layers; call attach_lora first")
    device = next(model.parameters()).device
    stacked = stack_adapters(adapters, layers, device) if adapters is not None else None
    try:
        if stacked is not None:
            for layer, (A, B, alpha) in zip(layers, stacked):
                layer.set_factors(A, B, alpha)
        yield
    finally:
        for layer in layers:
            layer.clear_factors()
