"""Token accounting, USD prices per engine and the frozen min-max cost normaliser.

Cost of one call = (n_in · price_in + n_out · price_out) / 1e6 with prices in USD per 1M tokens (the
candidate's `price_in` / `price_out`). An episode's cost is the sum over its calls. With `cost.pricing:
composition` (the paper's RQ5 table) every token of an episode instead costs its team's price: the candidates'
size classes per role, sorted and joined by '+' (small+small $0.2, large+small "Mixed" $0.5, large+large $0.8 per
1M tokens by default), so the cost-aware table can be reproduced exactly. The normaliser is
fitted once on the train split's episode costs, then frozen and reused for valid/test (paper App. F):

    norm = CostNormalizer.fit(train_costs)
    norm.save("runs/x/cost_normalizer.json")
    c_hat = CostNormalizer.load("runs/x/cost_normalizer.json")(episode_cost)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from haps_ray import storage
from haps_ray.config import CandidateConfig, ExperimentConfig, composition_label


@dataclass
class TokenCounts:
    """Input/output tokens of an episode, per role and per engine."""

    by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    by_engine: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, role: str, engine: str, n_in: int, n_out: int) -> None:
        for table, key in ((self.by_role, role), (self.by_engine, engine)):
            slot = table.setdefault(key, {"in": 0, "out": 0})
            slot["in"] += int(n_in)
            slot["out"] += int(n_out)

    @property
    def total_in(self) -> int:
        return sum(v["in"] for v in self.by_engine.values())

    @property
    def total_out(self) -> int:
        return sum(v["out"] for v in self.by_engine.values())

    def to_dict(self) -> dict:
        return {"by_role": {k: dict(v) for k, v in self.by_role.items()},
                "by_engine": {k: dict(v) for k, v in self.by_engine.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> TokenCounts:
        return cls({k: dict(v) for k, v in data.get("by_role", {}).items()},
                   {k: dict(v) for k, v in data.get("by_engine", {}).items()})


class PriceTable:
    """USD per 1M input / output tokens for each engine name, or per team (`composition`: team label -> USD per
    1M tokens, with `sizes`: engine name -> size class)."""

    def __init__(self, prices: dict[str, tuple[float, float]], composition: dict[str, float] | None = None,
                 sizes: dict[str, str] | None = None) -> None:
        for name, (p_in, p_out) in prices.items():
            if p_in < 0 or p_out < 0:
                raise ValueError(f"price of {name!r} must be >= 0, got in={p_in} out={p_out}")
        if composition is not None and set(sizes or {}) != set(prices):
            raise ValueError(f"composition pricing needs a size class for every engine {sorted(prices)}, got {sorted(sizes or {})}")
        self.prices = dict(prices)
        self.composition = None if composition is None else dict(composition)
        self.sizes = dict(sizes or {})

    @classmethod
    def from_candidates(cls, candidates: Sequence[CandidateConfig]) -> PriceTable:
        return cls({c.name: (c.price_in, c.price_out) for c in candidates})

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> PriceTable:
        """Prices as `cfg.cost.pricing` says: per candidate, or per team composition."""
        table = cls.from_candidates(cfg.candidates)
        if cfg.cost.pricing == "composition":
            table = cls(table.prices, cfg.cost.composition_prices, {c.name: c.size for c in cfg.candidates})
        return table

    def team_price(self, assignment: dict[str, str]) -> float:
        """USD per 1M tokens of the team `assignment` (role -> engine) under composition pricing."""
        label = composition_label([self.sizes[name] for name in assignment.values()])
        if label not in self.composition:
            raise KeyError(f"no composition price for team {label!r} (known: {sorted(self.composition)})")
        return self.composition[label]

    def call_cost(self, engine: str, n_in: int, n_out: int) -> float:
        """USD of one call on `engine`."""
        if engine not in self.prices:
            raise KeyError(f"no price for engine {engine!r} (known: {sorted(self.prices)})")
        p_in, p_out = self.prices[engine]
        return (n_in * p_in + n_out * p_out) / 1e6

    def episode_cost(self, tokens: TokenCounts, assignment: dict[str, str] | None = None) -> float:
        """USD of an episode from its per-engine token counts (and, under composition pricing, its team)."""
        if self.composition is not None:
            if assignment is None:
                raise ValueError("composition pricing needs the episode's assignment (role -> engine)")
            return (tokens.total_in + tokens.total_out) * self.team_price(assignment) / 1e6
        return sum(self.call_cost(name, c["in"], c["out"]) for name, c in tokens.by_engine.items())


@dataclass
class CostNormalizer:
    """Min-max normalisation of episode cost with bounds fitted on the train split and then frozen.

    Costs outside the fitted range (valid/test) are clipped to [0, 1] when `clip` is set; with a
    degenerate range (every train episode cost the same) every cost maps to 0.
    """

    low: float
    high: float
    clip: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high < self.low:
            raise ValueError(f"CostNormalizer needs finite low <= high, got low={self.low} high={self.high}")

    @classmethod
    def fit(cls, costs: Iterable[float], clip: bool = True) -> CostNormalizer:
        values = [float(c) for c in costs]
        if not values:
            raise ValueError("CostNormalizer.fit: no costs given (fit it on the train split's episode costs)")
        bad = [c for c in values if not math.isfinite(c) or c < 0]
        if bad:
            raise ValueError(f"CostNormalizer.fit: costs must be finite and >= 0, got {bad[:3]}")
        return cls(min(values), max(values), clip)

    def __call__(self, cost: float) -> float:
        span = self.high - self.low
        if span == 0:
            return 0.0
        value = (cost - self.low) / span
        return min(1.0, max(0.0, value)) if self.clip else value

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "clip": self.clip}

    def save(self, uri: str | Path) -> None:
        """Write the frozen bounds as JSON to a local path or an s3:// URI."""
        storage.write_text(str(uri), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, uri: str | Path) -> CostNormalizer:
        path = str(uri)
        if not storage.exists(path):
            raise FileNotFoundError(f"cost normaliser {path} does not exist (fit it on the train split first)")
        data = json.loads(storage.read_text(path))
        missing = {"low", "high"} - set(data)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        return cls(float(data["low"]), float(data["high"]), bool(data.get("clip", True)))
