"""High-level router: a causal LM that assigns one candidate LLM to every role, with exact probabilities.

The router answers the routing prompt with a JSON assignment z (see `prompt.py`). Its policy is

    π(z|x) = p(s_z|x) / Σ_{z'∈Z} p(s_z'|x),   s_z = canonical JSON of z + the token closing the turn,

computed exactly when |Z| = M^K <= `max_exact_assignments`. All |Z| answers of a prompt are scored in ONE forward
pass: each row is [prompt | s_z1 | s_z2 | ...] under a 4-D attention mask in which every answer block sees the
prompt and itself only, with positions that restart after the prompt (`score_targets`); the prompt is neither
recomputed nor copied per answer. Above that size z is sampled by generation (tolerant parsing; an unreadable
output is logged, counted and replaced by a uniformly random z) and log π(z|x) is the sequence log-probability of
the canonical string of the sampled z, scored the same way.

The same pass gives the hypernetwork its features: `TargetScores.pooled` is the mask-mean of the final hidden
states over the prompt (prompt positions never attend to the answers, so they equal a prompt-only pass).
`target_log_probs` teacher-forces any JSON string (the SFT loss). Token log-probs come from
`haps_ray.engine.logprobs.head_log_probs`: the LM head runs only where an answer token is predicted.

Supports decoder-only HF models whose logits are `lm_head(final hidden state)` (Llama, Qwen2, Mistral).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from haps_ray.engine.chat import ChatEncoder
from haps_ray.engine.hf_internals import custom_attention_mask
from haps_ray.engine.logprobs import head_log_probs, selective_log_softmax
from haps_ray.pooling import mean_pool
from haps_ray.routing.prompt import RoutingSpec, parse_assignment, problem_id, problem_text, routing_messages

logger = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """Tokenised routing prompts, left-padded so every prompt ends at the last column."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    ids: list[str]  # problem ids, for log lines
    rows: list[list[int]]  # the unpadded prompt tokens

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class TargetScores:
    """Teacher-forced answer blocks of one packed forward: per-token log-probs and the prompt features."""

    token_log_probs: torch.Tensor  # (B, J, L) float32, 0 at padding
    mask: torch.Tensor  # (B, J, L) bool: real answer tokens
    pooled: torch.Tensor  # (B, d) float32 mask-mean of the prompt's final hidden states

    @property
    def sums(self) -> torch.Tensor:
        """Summed log-prob of every block: (B, J)."""
        return self.token_log_probs.sum(-1)


@dataclass
class Decision:
    """The router's choice for one problem."""

    z: tuple[int, ...]
    log_prob: torch.Tensor  # scalar log π(z|x), differentiable
    fallback: bool = False  # generation path: output unreadable, z drawn uniformly instead
    text: str | None = None  # generation path: what the router wrote


@dataclass
class Routed:
    """A batch's decisions with the pass that produced them (its features feed the heads)."""

    decisions: list[Decision]
    pooled: torch.Tensor  # (B, d)
    table: torch.Tensor | None  # (B, |Z|) exact log π, None on the generation path

    def entropies(self) -> list[float]:
        """Entropy of π(·|x) per problem (NaN when Z was not enumerated)."""
        if self.table is None:
            return [float("nan")] * len(self.decisions)
        return (-(self.table.exp() * self.table).sum(-1)).tolist()


@dataclass
class GeneratedAssignment:
    """One decoded router answer: text, tokens (stop token included), their log-probs, the parse."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    z: tuple[int, ...] | None
    error: str | None


class HighLevelRouter(nn.Module):
    """Routing policy over Z = M^K assignments on top of a causal LM (`self.model`, trained in place)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: RoutingSpec,
        max_prompt_tokens: int = 1024,
        max_exact_assignments: int = 64,
        max_new_tokens: int = 48,
        compute_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(tokenizer, getattr(model, "generation_config", None), name="router")
        self.spec = spec
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.exact = spec.num_assignments <= max_exact_assignments
        self.compute_dtype = compute_dtype
        self.pad_id = self.encoder.pad_id
        self.rng = torch.Generator().manual_seed(seed)
        self.counters = {"generated": 0, "invalid": 0, "truncated_prompts": 0}
        self._target_cache: dict[str, list[int]] = {}
        # the token the chat template writes right after an assistant answer ends the router's turn
        self.end_id = self.encoder.turn_end_id(routing_messages(spec, "probe"), spec.canonical_json([0] * spec.num_roles))
        self.stop_ids = {self.end_id, *self.encoder.eos_ids}

    # ------------------------------------------------------------------ tokens

    def target_ids(self, answer: str) -> list[int]:
        """Tokens the router must emit to give `answer`: the answer's own tokens + the turn-end token.

        The answer is tokenised on its own (not across the prompt boundary), as generation emits it.
        """
        if answer not in self._target_cache:
            self._target_cache[answer] = self.encoder.tokens(answer) + [self.end_id]
        return self._target_cache[answer]

    def encode(self, problems: Sequence[Any]) -> PromptBatch:
        """Routing prompts (chat template, generation prompt on), truncated in the problem text, left-padded."""
        rows, ids = [], []
        for i, problem in enumerate(problems):
            pid = problem_id(problem, i)
            text = problem_text(problem)
            row = self.encoder.encode(routing_messages(self.spec, text), where=f"problem {pid}")
            if len(row) > self.max_prompt_tokens:
                row = self._truncate(text, len(row), pid)
            rows.append(row)
            ids.append(pid)
        input_ids, mask, _ = self.encoder.left_pad(rows, self.device)
        return PromptBatch(input_ids, mask, ids, rows)

    def _truncate(self, text: str, length: int, pid: str) -> list[int]:
        problem_ids = self.encoder.tokens(text)
        for _ in range(4):
            keep = len(problem_ids) - (length - self.max_prompt_tokens) - 4
            if keep <= 0:
                raise ValueError(
                    f"problem {pid}: routing prompt without the problem text is already {length - len(problem_ids)} "
                    f"tokens; raise router.max_prompt_tokens (now {self.max_prompt_tokens})"
                )
            problem_ids = problem_ids[:keep]
            text = self.tokenizer.decode(problem_ids) + " [...]"
            row = self.encoder.encode(routing_messages(self.spec, text), where=f"problem {pid}")
            length = len(row)
            if length <= self.max_prompt_tokens:
                self.counters["truncated_prompts"] += 1
                logger.info("problem %s: routing prompt truncated to %d tokens", pid, length)
                return row
        raise ValueError(f"problem {pid}: cannot truncate the routing prompt to router.max_prompt_tokens={self.max_prompt_tokens}")

    # ------------------------------------------------------------------ forward passes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 compute over fp32 master weights on GPU; a no-op on CPU."""
        if self.device.type == "cuda" and self.compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def score_targets(self, batch: PromptBatch, targets: Sequence[Sequence[Sequence[int]]]) -> TargetScores:
        """Teacher-force answer blocks `targets[b]` (token lists) after prompt b, all in one forward pass.

        Row b is laid out as [left padding | prompt | block 1 | block 2 | ...], each block holding its answer's
        tokens but the last (the first answer token is predicted from the prompt's last position). A block
        attends to the prompt and causally to itself; its positions continue the prompt's.
        """
        if len(targets) != len(batch):
            raise ValueError(f"{len(targets)} target rows for {len(batch)} prompts")
        device = self.device
        n_max = batch.input_ids.shape[1]
        blocks = max(len(t) for t in targets)
        width = max((len(tok) - 1 for row in targets for tok in row), default=0)
        if blocks == 0 or any(len(tok) == 0 for row in targets for tok in row):
            raise ValueError("every target row needs at least one non-empty answer")
        total = n_max + blocks * width
        ids = torch.full((len(batch), total), self.pad_id, dtype=torch.long)
        ids[:, :n_max] = batch.input_ids.cpu()
        valid = torch.zeros((len(batch), total), dtype=torch.bool)
        valid[:, :n_max] = batch.attention_mask.cpu().bool()
        block_of = torch.full((len(batch), total), -1, dtype=torch.long)  # -1: the prompt
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        where_b, where_pos, where_out, target_tokens = [], [], [], []
        for b, row in enumerate(targets):
            n = len(batch.rows[b])
            for j, tok in enumerate(row):
                start = n_max + j * width
                inputs = tok[:-1]
                ids[b, start:start + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                valid[b, start:start + len(inputs)] = True
                block_of[b, start:start + width] = j
                positions[b, start:start + width] = n + torch.arange(width)
                for k, token in enumerate(tok):
                    where_b.append(b)
                    where_pos.append(n_max - 1 if k == 0 else start + k - 1)  # the position that predicts token k
                    where_out.append((b * blocks + j) * (width + 1) + k)
                    target_tokens.append(token)
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        same_block = (block_of[:, None, :] == -1) | (block_of[:, None, :] == block_of[:, :, None])  # (B, q, k)
        allowed = causal & same_block & valid[:, None, :]
        allowed |= torch.eye(total, dtype=torch.bool)  # padding attends to itself: no all-masked (NaN) rows
        with self.autocast():
            mask = custom_attention_mask(allowed[:, None].to(device), self.model, self.model.dtype)
            hidden = self.model.get_decoder()(
                input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device), use_cache=False,
            ).last_hidden_state  # (B, total, d)
            rows = torch.tensor(where_b, device=device)
            picked = hidden[rows, torch.tensor(where_pos, device=device)]  # (N, d)
            logp = head_log_probs(picked, self.model.get_output_embeddings(), torch.tensor(target_tokens, device=device))
        flat = torch.zeros(len(batch) * blocks * (width + 1), device=device, dtype=torch.float32)
        flat = flat.index_put((torch.tensor(where_out, device=device),), logp)
        present = torch.zeros_like(flat, dtype=torch.bool).index_put((torch.tensor(where_out, device=device),),
                                                                     torch.ones_like(logp, dtype=torch.bool))
        shape = (len(batch), blocks, width + 1)
        return TargetScores(flat.view(shape), present.view(shape), mean_pool(hidden[:, :n_max], batch.attention_mask))

    def score(self, batch: PromptBatch, targets: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
        """Summed log-probs (B, J) of answer blocks `targets[b]` after prompt b (see `score_targets`)."""
        return self.score_targets(batch, targets).sums

    def _prompt_forward(self, batch: PromptBatch) -> tuple[torch.Tensor, DynamicCache]:
        """Last-position logits (B, V) and the KV cache of the prompts (the start of decoding)."""
        cache = DynamicCache()
        mask = batch.attention_mask
        with self.autocast():
            hidden = self.model.get_decoder()(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache, use_cache=True,
            ).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, -1]).float()
        return logits, cache

    def pooled(self, batch: PromptBatch) -> torch.Tensor:
        """Mask-mean (B, d) of the prompts' final hidden states (the features of a prompt-only pass)."""
        mask = batch.attention_mask
        with self.autocast():
            hidden = self.model.get_decoder()(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            ).last_hidden_state
        return mean_pool(hidden, mask)

    # ------------------------------------------------------------------ the policy

    def _all_targets(self, batch: PromptBatch) -> list[list[list[int]]]:
        zs = [self.target_ids(self.spec.canonical_json(z)) for z in self.spec.assignments()]
        return [zs] * len(batch)

    def _check_exact(self) -> None:
        if not self.exact:
            raise ValueError(
                f"|Z| = {self.spec.num_assignments} exceeds router.max_exact_assignments; "
                "exact probabilities are not enumerated (sample by generation instead)"
            )

    def assignment_scores(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact log π(z|x) for every z in `spec.assignments()` (B, |Z|, each row log-sums to 0), and the pooled
        prompt features (B, d), from one forward pass."""
        self._check_exact()
        scores = self.score_targets(batch, self._all_targets(batch))
        return scores.sums.log_softmax(dim=-1), scores.pooled

    def assignment_log_probs(self, batch: PromptBatch) -> torch.Tensor:
        """Exact (B, |Z|) table of log π(z|x)."""
        return self.assignment_scores(batch)[0]

    def evaluate(self, batch: PromptBatch, zs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(z_b|x_b) for given assignments (B,), differentiable, and the pooled features (B, d)."""
        if self.exact:
            table, pooled = self.assignment_scores(batch)
            index = torch.tensor([self.spec.index(z) for z in zs], device=table.device)
            return table.gather(1, index.unsqueeze(1)).squeeze(1), pooled
        scores = self.score_targets(batch, [[self.target_ids(self.spec.canonical_json(z))] for z in zs])
        return scores.sums[:, 0], scores.pooled

    def route(self, batch: PromptBatch, mode: str = "sample", seed: int | None = None) -> Routed:
        """Pick z per problem: `sample` from π (seeded), or `greedy` (argmax of π; greedy decoding above the exact
        limit). One scoring pass, whose features come along for the heads."""
        if mode not in ("sample", "greedy"):
            raise ValueError(f"mode must be 'sample' or 'greedy', got {mode!r}")
        generator = self.rng if seed is None else torch.Generator().manual_seed(seed)
        if self.exact:
            table, pooled = self.assignment_scores(batch)
            if mode == "greedy":
                picks = table.argmax(dim=-1).tolist()
            else:
                picks = torch.multinomial(table.detach().float().exp().cpu(), 1, generator=generator).squeeze(1).tolist()
            zs = self.spec.assignments()
            return Routed([Decision(zs[j], table[b, j]) for b, j in enumerate(picks)], pooled, table)
        generations = self._decode(batch, greedy=mode == "greedy", generator=generator)
        zs = [g.z if g.z is not None else self._uniform_assignment(generator) for g in generations]
        log_probs, pooled = self.evaluate(batch, zs)
        decisions = [Decision(z, log_probs[b], g.z is None, g.text) for b, (z, g) in enumerate(zip(zs, generations))]
        return Routed(decisions, pooled, None)

    def _uniform_assignment(self, generator: torch.Generator) -> tuple[int, ...]:
        """The fallback for an unreadable answer: every role's candidate drawn uniformly (seeded)."""
        draws = torch.randint(self.spec.num_candidates, (self.spec.num_roles,), generator=generator)
        return tuple(int(i) for i in draws)

    @torch.no_grad()
    def _decode(
        self, batch: PromptBatch, greedy: bool, generator: torch.Generator, max_new_tokens: int | None = None
    ) -> list[GeneratedAssignment]:
        """Decode answers from the prompts' cache (temperature 1, no top-k/top-p: the policy itself)."""
        steps = max_new_tokens or self.max_new_tokens
        logits, cache = self._prompt_forward(batch)
        size = len(batch)
        device = logits.device
        mask = batch.attention_mask
        positions = mask.sum(-1)
        stop = torch.tensor(sorted(self.stop_ids), device=device)
        tokens: list[list[int]] = [[] for _ in range(size)]
        logprobs: list[list[float]] = [[] for _ in range(size)]
        finished = torch.zeros(size, dtype=torch.bool, device=device)
        for _ in range(steps):
            if greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=generator).squeeze(1).to(device)
            chosen = selective_log_softmax(logits, nxt)
            for b in (~finished).nonzero().flatten().tolist():
                tokens[b].append(int(nxt[b]))
                logprobs[b].append(float(chosen[b]))
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with self.autocast():
                out = self.model.get_decoder()(
                    input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=positions.unsqueeze(1),
                    cache=cache, use_cache=True,
                )
                logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
            positions = positions + 1
        results = []
        for b in range(size):
            body = [t for t in tokens[b] if t not in self.stop_ids]
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            z, error = parse_assignment(text, self.spec)
            self.counters["generated"] += 1
            if z is None:
                self.counters["invalid"] += 1
                logger.warning("router output for problem %s is not an assignment (%s): %r", batch.ids[b], error, text[:200])
            results.append(GeneratedAssignment(text, tokens[b], logprobs[b], z, error))
        return results

    # ------------------------------------------------------------------ convenience entry points

    def sample(self, problems: Sequence[Any], seed: int | None = None) -> list[Decision]:
        return self.route(self.encode(problems), "sample", seed).decisions

    def greedy(self, problems: Sequence[Any]) -> list[Decision]:
        return self.route(self.encode(problems), "greedy").decisions

    def log_probs(self, problems: Sequence[Any]) -> torch.Tensor:
        """Exact (B, |Z|) table of log π(z|x)."""
        return self.assignment_log_probs(self.encode(problems))

    def log_prob(self, problems: Sequence[Any], zs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B,) log π(z_b|x_b) with gradients into the backbone."""
        if len(zs) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(zs)} assignments")
        return self.evaluate(self.encode(problems), zs)[0]

    def generate(
        self, problems: Sequence[Any], greedy: bool = True, seed: int | None = None, max_new_tokens: int | None = None
    ) -> list[GeneratedAssignment]:
        """Free generation (inspection, serving, large |Z|): text, tokens, log-probs and the tolerant parse."""
        generator = self.rng if seed is None else torch.Generator().manual_seed(seed)
        return self._decode(self.encode(problems), greedy, generator, max_new_tokens)

    def target_log_probs(self, problems: Sequence[Any], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (summed log-prob (B,), target token count (B,)) of given answers, e.g. canonical JSON.

        The SFT loss is `-(sum / count)` averaged over the batch: cross-entropy on the answer tokens only.
        """
        if len(answers) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(answers)} targets")
        targets = [[self.target_ids(a)] for a in answers]
        scores = self.score_targets(self.encode(problems), targets)
        return scores.sums[:, 0], scores.mask[:, 0].sum(-1)
