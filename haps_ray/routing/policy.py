"""The joint HAPS policy: router backbone + high-level router + hypernetwork heads in one module.

For a batch of problems, one backbone forward over the routing prompts feeds both levels: the
high-level router scores (or decodes) assignments z from its logits and KV cache, and the heads read
the mask-mean of the same final hidden states to write one LoRA adapter per chosen open-source
candidate. This is what RL, evaluation and serving call:

    policy = HAPSPolicy.from_config(cfg, adapter_shapes={"llama": [(64, 64)], ...})
    actions = policy.act(problems, mode="sample", seed=step)     # z, log π(z|x), adapters
    actions[0].adapters["llama"]                                  # haps_ray.lora.Adapter, for the engine
    policy.save(run_dir / "policy"); HAPSPolicy.load(run_dir / "policy")   # bit-exact round trip

The backbone keeps fp32 master weights with gradients on (load_model hands out frozen models). The ablations
are structures of this one module (RL picks which parts it updates, `rl.train_router`):
- `low_level=False`: no heads at all; every action has no adapters (the paper's w/o low-level router);
- `share_backbone=False`: the heads read a separate copy of the initial backbone, trained by the generator loss
  (`separate_backbone="trained"`, the paper's w/o parameter sharing, with the router frozen in RL) or frozen;
- `backbone_grad=False`: the shared pooled features are detached.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from haps_ray.config import ExperimentConfig, RouterConfig, from_dict, to_dict
from haps_ray.lora import Adapter
from haps_ray.models import load_model
from haps_ray.pooling import mean_pool
from haps_ray.routing.high_level import HighLevelRouter, PromptBatch
from haps_ray.routing.hypernet import HyperNetwork, shapes_from_hf_config
from haps_ray.routing.prompt import RoutingSpec

HEADS_FILE = "heads.safetensors"
META_FILE = "policy.json"


@dataclass
class Action:
    """The policy's output for one problem."""

    problem_id: str
    assignment: tuple[int, ...]  # candidate index per role, in role order
    z: dict[str, int]  # role -> candidate index
    log_prob: torch.Tensor  # scalar log π(z|x), differentiable into the backbone
    adapters: dict[str, Adapter]  # candidate name -> adapter, only open candidates that z uses
    fallback: bool = False  # the router's generated answer was unreadable; z was drawn uniformly
    router_text: str | None = None  # generation path: the router's raw answer
    entropy: float = float("nan")  # of π(·|x) over Z (NaN when Z is too large to enumerate)
    table: torch.Tensor | None = None  # (|Z|,) log π(z|x) over spec.assignments(); None when Z is not enumerated


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for router.dtype on this device (None = plain fp32)."""
    if device.type != "cuda" or name == "float32":
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.bfloat16}[name]


def candidate_shapes(source: str, k: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of a candidate's last k `o_proj` layers: from config.json when `source` is a model
    directory, else by loading the model once on CPU (packs, tiny builders, GGUF, S3)."""
    directory = Path(source).expanduser()
    if (directory / "config.json").is_file():
        return shapes_from_hf_config(AutoConfig.from_pretrained(directory), k)
    return shapes_from_hf_config(load_model(source, device="cpu")[0].config, k)


# RouterConfig fields that decide which modules a policy has: a checkpoint built with other values is another
# model (another ablation), never silently continued under this config
STRUCTURE_FIELDS = ("low_level", "share_backbone", "separate_backbone")


def check_structure(path: str | Path, cfg: RouterConfig) -> None:
    """Raise ValueError when the policy saved at `path` was built with other `STRUCTURE_FIELDS` than `cfg`."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a policy checkpoint (no {META_FILE})")
    saved = from_dict(RouterConfig, json.loads(meta_path.read_text())["router"], "router")
    differ = [f"router.{name}={getattr(saved, name)!r} (config: {getattr(cfg, name)!r})"
              for name in STRUCTURE_FIELDS if getattr(saved, name) != getattr(cfg, name)]
    if differ:
        raise ValueError(f"{path}: this policy was built with {', '.join(differ)}; run SFT with this config to start "
                         "that variant")


class HAPSPolicy(nn.Module):
    """Router backbone, high-level router and per-candidate hypernetwork heads."""

    def __init__(
        self,
        router: HighLevelRouter,
        adapter_shapes: Mapping[str, Sequence[tuple[int, int]]],
        open_source: Sequence[bool],
        cfg: RouterConfig,
        feature_model: PreTrainedModel | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        spec = router.spec
        if len(open_source) != spec.num_candidates:
            raise ValueError(f"open_source has {len(open_source)} flags for {spec.num_candidates} candidates")
        # without the low level no candidate gets a head: shapes (if given) are not needed
        open_names = [n for n, flag in zip(spec.candidates, open_source) if flag] if cfg.low_level else []
        closed = sorted(set(adapter_shapes) - {n for n, flag in zip(spec.candidates, open_source) if flag})
        missing = [n for n in open_names if n not in adapter_shapes]
        if closed:
            raise ValueError(f"adapter shapes given for {closed}, which are not open-source candidates (closed ones get no head)")
        if missing:
            raise ValueError(f"no adapter shapes for open-source candidates {missing}")
        self.cfg = cfg
        self.open_source = tuple(bool(f) for f in open_source)
        self.router = router
        device = router.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hypernet = HyperNetwork(router.model.config.hidden_size, {n: adapter_shapes[n] for n in open_names}, cfg)
        self.hypernet.to(device)
        # load_model hands out frozen models; the policy trains its backbone (fp32 master weights).
        router.model.float().requires_grad_(True)
        self.feature_model: PreTrainedModel | None = None
        if not cfg.share_backbone:
            separate = feature_model if feature_model is not None else copy.deepcopy(router.model)
            trained = cfg.separate_backbone == "trained"
            # eval mode either way: no dropout, so the features an update sees are the ones the rollout used
            self.feature_model = separate.to(device).float().eval().requires_grad_(trained)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, adapter_shapes: Mapping[str, Sequence[tuple[int, int]]] | None = None
    ) -> HAPSPolicy:
        """Load the router backbone and build heads for every open candidate.

        Pass `adapter_shapes` (e.g. from `LLMEngine.info()["adapter_shapes"]`) to avoid loading candidate
        weights here; without it each open candidate is loaded once to read its config.
        """
        model, tokenizer = load_model(cfg.router.backbone, dtype="float32", device=cfg.router.device)
        router = HighLevelRouter(
            model,
            tokenizer,
            RoutingSpec.from_config(cfg),
            max_prompt_tokens=cfg.router.max_prompt_tokens,
            max_exact_assignments=cfg.router.max_exact_assignments,
            max_new_tokens=cfg.router.max_new_tokens,
            compute_dtype=compute_dtype(cfg.router.dtype, next(model.parameters()).device),
            seed=cfg.seed,
        )
        if adapter_shapes is None:
            adapter_shapes = ({c.name: candidate_shapes(c.model, cfg.router.lora_layers) for c in cfg.open_candidates}
                              if cfg.router.low_level else {})
        return cls(router, adapter_shapes, [c.open_source for c in cfg.candidates], cfg.router, seed=cfg.seed)

    # ------------------------------------------------------------------ acting

    @property
    def spec(self) -> RoutingSpec:
        return self.router.spec

    def features(self, batch: PromptBatch, pooled: torch.Tensor) -> torch.Tensor:
        """Prompt features (B, d) for the heads: the router pass's pooled states, or the separate backbone's own pass
        (with its graph when that backbone is trained and gradients are on)."""
        if self.feature_model is None:
            return pooled if self.cfg.backbone_grad else pooled.detach()
        mask = batch.attention_mask
        trained = self.cfg.separate_backbone == "trained"
        with torch.set_grad_enabled(trained and torch.is_grad_enabled()), self.router.autocast():
            hidden = self.feature_model.get_decoder()(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
            ).last_hidden_state
        return mean_pool(hidden, mask)

    def adapters_for(self, features: torch.Tensor, assignments: Sequence[Sequence[int]]) -> list[dict[str, Adapter]]:
        """Per problem: one adapter for each open candidate its assignment uses (one head pass per candidate)."""
        out: list[dict[str, Adapter]] = [{} for _ in assignments]
        for cid, name in enumerate(self.spec.candidates):
            if name not in self.hypernet.names:  # a closed candidate, or no low level at all
                continue
            rows = [b for b, z in enumerate(assignments) if cid in z]
            if rows:
                for b, adapter in zip(rows, self.hypernet.adapters(name, features[rows])):
                    out[b][name] = adapter
        return out

    def act(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None) -> list[Action]:
        """Choose z for every problem (`sample` from π or `greedy`) and write the adapters it needs, from one
        router pass (its log π and adapters keep their graph when gradients are on)."""
        batch = self.router.encode(problems)
        routed = self.router.route(batch, mode, seed)
        decisions = routed.decisions
        adapters = self.adapters_for(self.features(batch, routed.pooled), [d.z for d in decisions])
        tables = [None] * len(decisions) if routed.table is None else list(routed.table)
        return [
            Action(pid, d.z, self.spec.as_dict(d.z), d.log_prob, ads, d.fallback, d.text, entropy, table)
            for pid, d, ads, entropy, table in zip(batch.ids, decisions, adapters, routed.entropies(), tables)
        ]

    def evaluate(self, problems: Sequence[Any], assignments: Sequence[Sequence[int] | Mapping[str, int]]) -> list[Action]:
        """log π(z|x) and adapters for given assignments (fixed or random routing, re-scoring a rollout's choices)."""
        if len(assignments) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(assignments)} assignments")
        zs = [self.spec.from_dict(z) if isinstance(z, Mapping) else tuple(int(i) for i in z) for z in assignments]
        batch = self.router.encode(problems)
        log_probs, pooled = self.router.evaluate(batch, zs)
        adapters = self.adapters_for(self.features(batch, pooled), zs)
        return [
            Action(pid, z, self.spec.as_dict(z), log_probs[b], ads)
            for b, (pid, z, ads) in enumerate(zip(batch.ids, zs, adapters))
        ]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimiser group: the router backbone, the hypernetwork heads (none without the
        low level) and the heads' separate backbone (only when it is trained)."""
        separate = self.feature_model.parameters() if self.feature_model is not None else []
        return {
            "router": [p for p in self.router.model.parameters() if p.requires_grad],
            "heads": [p for p in self.hypernet.parameters() if p.requires_grad],
            "feature_backbone": [p for p in separate if p.requires_grad],
        }

    def freeze_router(self) -> None:
        """Stop gradients into the router backbone (RL with `rl.train_router: false`): log π(z|x) and, with a shared
        backbone, the heads' features become constants; the heads and a separate trained backbone still learn."""
        self.router.model.requires_grad_(False)

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> None:
        """Backbone (HF save_pretrained + tokenizer), the frozen copy if any, heads (safetensors), metadata."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.router.model.save_pretrained(path / "backbone")
        self.router.tokenizer.save_pretrained(path / "backbone")
        if self.feature_model is not None:
            self.feature_model.save_pretrained(path / "feature_backbone")
            self.router.tokenizer.save_pretrained(path / "feature_backbone")  # a loadable model directory
        shapes = self.hypernet.shapes()
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.hypernet.state_dict().items()}
        save_file(tensors, str(path / HEADS_FILE), metadata={"names": json.dumps(self.hypernet.names)})
        spec = self.spec
        meta = {
            "router": to_dict(self.cfg),
            "spec": {
                "task": spec.task,
                "roles": list(spec.roles),
                "candidates": list(spec.candidates),
                "candidate_descriptions": dict(spec.candidate_descriptions),
                "role_descriptions": dict(spec.role_descriptions),
            },
            "open_source": list(self.open_source),
            "adapter_shapes": {n: [list(s) for s in v] for n, v in shapes.items()},
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", seed: int = 0) -> HAPSPolicy:
        """Rebuild a saved policy; every weight comes back bit-exactly."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a policy checkpoint (no {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        cfg = from_dict(RouterConfig, meta["router"], "router")
        spec_meta = meta["spec"]
        spec = RoutingSpec(
            task=spec_meta["task"],
            roles=tuple(spec_meta["roles"]),
            candidates=tuple(spec_meta["candidates"]),
            candidate_descriptions=spec_meta["candidate_descriptions"],
            role_descriptions=spec_meta["role_descriptions"],
        )
        model, tokenizer = load_model(str(path / "backbone"), dtype="float32", device=device)
        router = HighLevelRouter(
            model,
            tokenizer,
            spec,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_exact_assignments=cfg.max_exact_assignments,
            max_new_tokens=cfg.max_new_tokens,
            compute_dtype=compute_dtype(cfg.dtype, next(model.parameters()).device),
            seed=seed,
        )
        feature_model = None
        if not cfg.share_backbone:
            feature_model, _ = load_model(str(path / "feature_backbone"), dtype="float32", device=device)
        shapes = {n: [tuple(s) for s in v] for n, v in meta["adapter_shapes"].items()}
        policy = cls(router, shapes, meta["open_source"], cfg, feature_model=feature_model, seed=seed)
        tensors = load_file(str(path / HEADS_FILE), device=str(router.device))
        policy.hypernet.load_state_dict(tensors, strict=True)
        return policy
