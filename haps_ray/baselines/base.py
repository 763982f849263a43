"""The interface every baseline router implements, and the data they all fit on.

A baseline routes a problem to an assignment z (one candidate per role) from its query embedding alone (no
adapters: the engines stay frozen). It is fitted on D's train rows and selected on D's valid rows, with the
reward HAPS itself optimises: `haps_ray.dataset.with_reward` applies λ (cost) and shaping on read, so one D serves
every λ.

    train = routing_data(d, "train", spec, embeddings, z_embeddings)      # d carries the derived `reward`
    router = RouteLLMRouter(spec, cfg.baselines, seed=cfg.seed)
    summary = router.fit(train, valid)                                     # selection on valid inside
    zs = router.route(problems, encoder)                                   # list of tuples, candidate per role
    router.save(uri); same = load_router(uri)                              # same routes

`RoutingData` holds one split as dense tensors: embeddings (N, d), reward / perf / cost_norm (N, |Z|) and
`available` (N, |Z|), false where D has no row for (problem, z) (a build still running).
"""

from __future__ import annotations

import itertools
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from haps_ray import storage
from haps_ray.config import BaselinesConfig, ExperimentConfig, from_dict, to_dict
from haps_ray.dataset import assignment_index

logger = logging.getLogger(__name__)

META_FILE, STATE_FILE = "router.json", "state.safetensors"


@dataclass
class RouterSpec:
    """What a baseline routes over: the candidate pool, the roles, their descriptors, and the reward's λ."""

    candidates: list[str]
    roles: list[str]
    task: str
    lam: float
    shaping: bool
    descriptions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> RouterSpec:
        return cls([c.name for c in cfg.candidates], list(cfg.task.roles), cfg.task.name, cfg.reward.lam,
                   cfg.reward.shaping, dict(cfg.router.candidate_descriptions))

    @property
    def assignments(self) -> list[tuple[int, ...]]:
        """Z = M^K in z_index order (as `haps_ray.dataset.assignments`)."""
        return list(itertools.product(range(len(self.candidates)), repeat=len(self.roles)))

    def assignment_text(self, z: Sequence[int]) -> str:
        """The textual descriptor of a team: each role with its candidate's name and description."""
        parts = []
        for role, i in zip(self.roles, z, strict=True):
            name = self.candidates[i]
            desc = self.descriptions.get(name, "")
            parts.append(f"{role}: {name}" + (f" ({desc})" if desc else ""))
        return "; ".join(parts)


@dataclass
class RoutingData:
    """One split of D as dense tensors over its problems (rows) and Z (columns)."""

    problem_ids: list[str]
    embeddings: torch.Tensor  # (N, d) query embeddings
    reward: torch.Tensor  # (N, Z) R = (1-λ)·shape(perf) − λ·Ĉ
    perf: torch.Tensor  # (N, Z) raw task metric
    cost_norm: torch.Tensor  # (N, Z) Ĉ (0 where D's normaliser is absent)
    available: torch.Tensor  # (N, Z) bool: D holds the row
    z_embeddings: torch.Tensor  # (Z, d) embedding of each team's textual descriptor

    def __len__(self) -> int:
        return len(self.problem_ids)

    def routed_reward(self, choices: torch.Tensor) -> float:
        """Mean reward of one chosen z index per problem; a z D lacks for a problem scores that problem's worst."""
        rows = torch.arange(len(self))
        worst = torch.where(self.available, self.reward, torch.inf).min(dim=1).values
        got = torch.where(self.available[rows, choices], self.reward[rows, choices], worst)
        return float(got.mean()) if len(self) else float("nan")

    def oracle_reward(self) -> float:
        return float(torch.where(self.available, self.reward, -torch.inf).max(dim=1).values.mean())


def check_candidates(table: pa.Table, spec: RouterSpec) -> None:
    """Refuse a D whose pool is not the config's: a baseline must know every candidate it may route to."""
    pools = {tuple(n) for n in table.column("engine_names").to_pylist()}
    if not pools:
        raise ValueError("D has no rows to fit a baseline router on")
    for pool in pools:
        missing = [c for c in spec.candidates if c not in pool]
        extra = [c for c in pool if c not in spec.candidates]
        if missing:
            raise ValueError(f"D was built without candidate(s) {missing} (its pool: {list(pool)}); a baseline cannot "
                             f"learn to route to them: rebuild D with the configured candidates {spec.candidates}")
        if extra or list(pool) != spec.candidates:
            raise ValueError(f"D's pool {list(pool)} is not the configured {spec.candidates} (extra: {extra}); "
                             "z indices would mean other candidates")
    used = {i for z in table.column("z").to_pylist() for i in z}
    unseen = [name for i, name in enumerate(spec.candidates) if i not in used]
    if unseen:
        raise ValueError(f"D holds no row in which candidate(s) {unseen} play any role; build D over every z first")


def routing_data(table: pa.Table, split: str, spec: RouterSpec, embeddings: Mapping[str, torch.Tensor],
                 z_embeddings: torch.Tensor) -> RoutingData:
    """Split `split` of D (with the derived `reward`) as `RoutingData`; `embeddings` maps problem id -> (d,)."""
    if "reward" not in table.column_names:
        raise ValueError("D lacks the derived 'reward' column; call haps_ray.dataset.with_reward first")
    check_candidates(table, spec)
    rows = table.filter(pc.equal(table.column("split"), split)).select(
        ["problem_id", "z", "reward", "perf", "cost_norm"]).to_pylist()
    if not rows:
        raise ValueError(f"D has no {split!r} rows to fit or select a baseline router on")
    ids = list(dict.fromkeys(r["problem_id"] for r in rows))
    missing = [pid for pid in ids if pid not in embeddings]
    if missing:
        raise ValueError(f"{split}: no query embedding for D's problems {missing[:5]} (of {len(missing)}): "
                         "the problems loaded for this split are not the ones D was built on")
    n_z, index = len(spec.assignments), {pid: i for i, pid in enumerate(ids)}
    out = {name: torch.zeros(len(ids), n_z) for name in ("reward", "perf", "cost_norm")}
    available = torch.zeros(len(ids), n_z, dtype=torch.bool)
    for r in rows:
        i, j = index[r["problem_id"]], assignment_index(r["z"], len(spec.candidates))
        for name in out:
            out[name][i, j] = float(r[name] or 0.0)
        available[i, j] = True
    return RoutingData(ids, torch.stack([embeddings[pid].float() for pid in ids]), out["reward"], out["perf"],
                       out["cost_norm"], available, z_embeddings.float())


class BaselineRouter(ABC):
    """Fit on train, select on valid, route by query embedding, save/load. Subclasses set `name` and build
    `self.model` (an nn.Module whose state is saved) in `build(dim)`."""

    name: ClassVar[str]

    def __init__(self, spec: RouterSpec, cfg: BaselinesConfig, seed: int = 0) -> None:
        self.spec, self.cfg, self.seed = spec, cfg, seed
        self.model: nn.Module | None = None
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ what a router defines

    @abstractmethod
    def build(self, query_dim: int, z_embeddings: torch.Tensor) -> nn.Module:
        """A fresh model for queries of width `query_dim` (seeded by the caller)."""

    @abstractmethod
    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, Z) routing utilities of each z for each query (higher is better)."""

    def choose(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) chosen z index per query: the best utility (RouteLLM overrides this with its threshold)."""
        return self.scores(embeddings).argmax(dim=1)

    @abstractmethod
    def fit(self, train: RoutingData, valid: RoutingData) -> dict[str, Any]:
        """Train on `train`, select on `valid`; returns a summary (also kept in `self.summary`)."""

    # ------------------------------------------------------------------ shared

    def _fresh(self, train: RoutingData) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = self.build(train.embeddings.shape[1], train.z_embeddings)
        self.remember_build(train.embeddings.shape[1], train.z_embeddings)
        return self.model

    def route_embeddings(self, embeddings: torch.Tensor) -> list[tuple[int, ...]]:
        if self.model is None:
            raise RuntimeError(f"{self.name}: not fitted (call fit or load_router first)")
        zs = self.spec.assignments
        with torch.no_grad():
            return [zs[int(i)] for i in self.choose(embeddings.float())]

    def route(self, problems: Sequence[Any], encoder: Any) -> list[tuple[int, ...]]:
        """One assignment (candidate index per role) per problem, from the encoder's query embeddings."""
        return self.route_embeddings(encoder.encode(problems))

    def valid_reward(self, valid: RoutingData) -> float:
        with torch.no_grad():
            return valid.routed_reward(self.choose(valid.embeddings))

    def train_epochs(self, train: RoutingData, valid: RoutingData, loss_fn: Callable[[], torch.Tensor],
                     lr: float, weight_decay: float = 0.0) -> dict[str, Any]:
        """Full-batch Adam for `cfg.epochs`, keeping the state of the epoch with the best valid reward."""
        assert self.model is not None
        optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        best, best_state, best_epoch, history = -float("inf"), None, 0, []
        for epoch in range(1, self.cfg.epochs + 1):
            self.model.train()
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            self.model.eval()
            reward = self.valid_reward(valid)
            history.append({"epoch": epoch, "loss": loss.item(), "valid_reward": reward})
            if reward > best:
                best, best_epoch = reward, epoch
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(best_state)
        self.summary = {"router": self.name, "best_epoch": best_epoch, "valid_reward": best, "epochs": len(history),
                        "valid_oracle": valid.oracle_reward(), "train_problems": len(train), "valid_problems": len(valid),
                        "history": history}
        logger.info("%s: best valid reward %.4f at epoch %d of %d (oracle %.4f)", self.name, best, best_epoch,
                    len(history), self.summary["valid_oracle"])
        return self.summary

    # ------------------------------------------------------------------ persistence

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the model's state a router needs to route (e.g. IRT-Router's warm-up bank)."""
        return {"z_embeddings": self.z_embeddings}

    def load_extra_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Counterpart of `extra_state`."""

    def save(self, uri: str) -> None:
        """<uri>/router.json (name, spec, config, summary, shapes) and <uri>/state.safetensors."""
        if self.model is None:
            raise RuntimeError(f"{self.name}: nothing to save before fit")
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"extra.{k}": v.contiguous() for k, v in self.extra_state().items()})
        meta = {"router": self.name, "spec": asdict(self.spec), "baselines": to_dict(self.cfg), "seed": self.seed,
                "build": self.build_args, "summary": {k: v for k, v in self.summary.items() if k != "history"}}
        storage.write_bytes(storage.join(uri, STATE_FILE), save_tensors(tensors))
        storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2))

    @property
    def build_args(self) -> dict[str, Any]:
        """What `build` needs again at load time: the query width and the team descriptor embeddings' shape."""
        return self._build_args

    def remember_build(self, query_dim: int, z_embeddings: torch.Tensor) -> None:
        self.z_embeddings = z_embeddings.float().contiguous()
        self._build_args = {"query_dim": int(query_dim), "z_shape": list(z_embeddings.shape)}


def load_router(uri: str, registry: Mapping[str, type[BaselineRouter]]) -> BaselineRouter:
    """A router saved by `BaselineRouter.save`, ready to route (bit-identical state)."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"no fitted baseline router at {uri} ({META_FILE} missing)")
    meta = json.loads(storage.read_text(meta_uri))
    if meta["router"] not in registry:
        raise ValueError(f"{uri}: unknown baseline router {meta['router']!r} (known: {sorted(registry)})")
    cls = registry[meta["router"]]
    router = cls(RouterSpec(**meta["spec"]), from_dict(BaselinesConfig, meta["baselines"], "baselines"), meta["seed"])
    tensors = load_tensors(storage.read_bytes(storage.join(uri, STATE_FILE)))
    z_embeddings = tensors["extra.z_embeddings"]
    router.remember_build(meta["build"]["query_dim"], z_embeddings)
    router.model = router.build(meta["build"]["query_dim"], z_embeddings)
    router.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    router.model.eval()
    router.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    router.summary = meta["summary"]
    return router
