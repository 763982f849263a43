"""Low-level router: hypernetwork heads that write a per-input LoRA adapter for each open candidate.

Head γ_m of open candidate m maps the pooled router features f(x) (mask-mean of the backbone's final
hidden states, `TargetScores.pooled`) to LoRA factors for `o_proj` of m's last k decoder layers:

    h = MLP(f(x))                 mlp_layers × (Linear(hidden) + ReLU)
    A = out_A(h) -> (k, r, d_in)  down-projection (peft naming, see haps_ray/lora.py)
    B = out_B(h) -> (k, d_out, r) up-projection;  ΔW_l = α · B_l A_l

With `per_layer_adapters=False` the heads emit one (A, B) and every layer uses that same tensor (the
authors' code). `init="zero"` zeroes out_B so every adapter starts at ΔW = 0 exactly; `init="authors"`
is their Xavier-uniform init of every linear layer (biases zero), so ΔW starts non-zero.
Closed-source candidates have no head and never get an adapter. Heads are fp32.

    net = HyperNetwork(d_model, {"llama": [(64, 64)], "qwen": [(48, 48)]}, router_cfg)
    adapters = net.adapters("llama", pooled)   # list[Adapter], one per row of pooled
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from haps_ray.config import RouterConfig
from haps_ray.lora import Adapter


def shapes_from_hf_config(config: PretrainedConfig, k: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of `o_proj` in each of the last k layers, read from an HF config (no weights needed)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    layers = text.num_hidden_layers
    if not 1 <= k <= layers:
        raise ValueError(f"lora_layers k={k} must be in [1, {layers}] for {type(config).__name__}")
    return [(text.num_attention_heads * head_dim, hidden)] * k


class LoRAHead(nn.Module):
    """γ_m: pooled features (b, d_model) -> A (b, k, r, d_in), B (b, k, d_out, r)."""

    def __init__(
        self,
        d_model: int,
        layer_shapes: Sequence[tuple[int, int]],
        rank: int,
        hidden: int,
        mlp_layers: int,
        per_layer: bool,
        init: str,
    ) -> None:
        super().__init__()
        if not layer_shapes or len(set(layer_shapes)) != 1:
            raise ValueError(f"every wrapped layer must have the same (d_in, d_out), got {list(layer_shapes)}")
        self.k = len(layer_shapes)
        self.d_in, self.d_out = layer_shapes[0]
        self.rank = rank
        self.emitted = self.k if per_layer else 1
        blocks: list[nn.Module] = []
        width = d_model
        for _ in range(mlp_layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*blocks)
        self.out_A = nn.Linear(hidden, self.emitted * rank * self.d_in)
        self.out_B = nn.Linear(hidden, self.emitted * self.d_out * rank)
        for layer in [m for m in self.mlp if isinstance(m, nn.Linear)] + [self.out_A, self.out_B]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if init == "zero":
            nn.init.zeros_(self.out_B.weight)
        elif init != "authors":
            raise ValueError(f"router.init must be 'zero' or 'authors', got {init!r}")
        self.float()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp(features.float())  # (b, hidden)
        b = h.shape[0]
        A = self.out_A(h).view(b, self.emitted, self.rank, self.d_in)
        B = self.out_B(h).view(b, self.emitted, self.d_out, self.rank)
        if self.emitted != self.k:
            # One adapter shared by all k layers: the same tensor, so its gradient sums over layers.
            A = A.expand(b, self.k, self.rank, self.d_in)
            B = B.expand(b, self.k, self.d_out, self.rank)
        return A, B


class HyperNetwork(nn.Module):
    """One `LoRAHead` per open-source candidate, keyed by candidate name."""

    def __init__(self, d_model: int, adapter_shapes: Mapping[str, Sequence[tuple[int, int]]], cfg: RouterConfig) -> None:
        super().__init__()
        self.names = list(adapter_shapes)
        self.alpha = float(cfg.lora_alpha)
        self.d_model = d_model
        heads = []
        for name in self.names:
            shapes = [tuple(s) for s in adapter_shapes[name]]
            if len(shapes) != cfg.lora_layers:
                raise ValueError(f"candidate {name}: {len(shapes)} adapter shapes for router.lora_layers={cfg.lora_layers}")
            heads.append(
                LoRAHead(d_model, shapes, cfg.lora_rank, cfg.hidden, cfg.mlp_layers, cfg.per_layer_adapters, cfg.init)
            )
        # A ModuleList, not a ModuleDict: candidate names may contain '.', which module keys cannot.
        self.heads = nn.ModuleList(heads)

    def head(self, name: str) -> LoRAHead:
        if name not in self.names:
            raise KeyError(f"no hypernetwork head for candidate {name!r} (open candidates: {self.names})")
        return self.heads[self.names.index(name)]

    def adapters(self, name: str, features: torch.Tensor) -> list[Adapter]:
        """Adapters for candidate `name`, one per row of `features` (b, d_model)."""
        A, B = self.head(name)(features)
        return [Adapter(A[i], B[i], self.alpha) for i in range(A.shape[0])]

    def shapes(self) -> dict[str, list[tuple[int, int]]]:
        return {name: [(h.d_in, h.d_out)] * h.k for name, h in zip(self.names, self.heads)}
