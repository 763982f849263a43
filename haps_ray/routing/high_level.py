"""High-level router: a causal LM that assigns one candidate LLM to every role, with exact probabilities.

The router answers the routing prompt with a JSON assignment z (see `prompt.py`). Its policy is

    π(z|x) = p(s_z|x) / Σ_{z'∈Z} p(s_z'|x),   s_z = canonical JSON of z + the token closing the turn,

computed exactly when |Z| = M^K <= `max_exact_assignments`: the prompt runs once, its KV cache is
gathered for every (problem, z) row and all |Z| targets are teacher-forced in one batched pass, so the
prompt is never recomputed. Above that size z is sampled by generation (tolerant parsing; an unreadable
output is logged, counted and replaced by a uniformly random z) and log π(z|x) is the sequence
log-probability of the canonical string of the sampled z.

The same prompt pass (`forward_prompt`) feeds the hypernetwork: `PromptState.pooled()` is the mask-mean
of the final hidden states. `target_log_probs` teacher-forces any JSON string (the SFT loss).

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

from haps_ray.routing.prompt import RoutingSpec, parse_assignment, problem_id, problem_text, routing_messages

logger = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """Tokenised routing prompts, left-padded so every prompt ends at the last column."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    ids: list[str]  # problem ids, for log lines


@dataclass
class PromptState:
    """One forward pass over a batch of prompts, shared by the scorer, the decoder and the hypernetwork."""

    hidden: torch.Tensor  # (B, T, d) final hidden states (after the final norm)
    attention_mask: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,) real prompt tokens = position id of the first answer token
    next_logits: torch.Tensor  # (B, V) logits of the first answer token
    past: list[tuple[torch.Tensor, torch.Tensor]]  # per layer keys, values: (B, heads, T, head_dim)

    def pooled(self) -> torch.Tensor:
        """Mask-mean of the final hidden states over real prompt tokens: (B, d), fp32."""
        return mean_pool(self.hidden, self.attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, d) over positions where attention_mask (B, T) is 1: (B, d), fp32."""
    mask = attention_mask.bool().unsqueeze(-1)
    # where(), not a product: padded positions must not leak even a NaN into the mean.
    summed = torch.where(mask, hidden.float(), 0.0).sum(dim=1)
    return summed / mask.sum(dim=1).float()


@dataclass
class Decision:
    """The router's choice for one problem."""

    z: tuple[int, ...]
    log_prob: torch.Tensor  # scalar log π(z|x), differentiable
    fallback: bool = False  # generation path: output unreadable, z drawn uniformly instead
    text: str | None = None  # generation path: what the router wrote


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
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("router tokenizer has no chat template; the routing prompt needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.exact = spec.num_assignments <= max_exact_assignments
        self.compute_dtype = compute_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rng = torch.Generator().manual_seed(seed)
        self.counters = {"generated": 0, "invalid": 0, "truncated_prompts": 0}
        self._target_cache: dict[str, list[int]] = {}
        plain = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self._bos = bos if bos is not None and plain and plain[0] == bos else None
        self.end_id = self._turn_end_id()
        self.stop_ids = {self.end_id, *self._eos_ids()}

    # ------------------------------------------------------------------ tokens

    def _eos_ids(self) -> list[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        # Exactly one BOS, as the engines do: the template's, or one prepended when the tokenizer normally
        # adds BOS but the template does not write it.
        ids = list(self.tokenizer(self._template(messages, generation_prompt), add_special_tokens=False)["input_ids"])
        if self._bos is not None and (not ids or ids[0] != self._bos):
            ids.insert(0, self._bos)
        return ids

    def _turn_end_id(self) -> int:
        """The token the chat template writes right after an assistant answer (it ends the router's turn)."""
        answer = self.spec.canonical_json([0] * self.spec.num_roles)
        messages = routing_messages(self.spec, "probe")
        prompt = self._template(messages, generation_prompt=True)
        full = self._template(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
        if not full.startswith(prompt + answer):
            raise ValueError("router chat template: a rendered answer does not follow its generation prompt verbatim")
        after = self.tokenizer(full[len(prompt + answer) :], add_special_tokens=False)["input_ids"]
        if after:
            return after[0]
        eos = self._eos_ids()
        if not eos:
            raise ValueError("router chat template closes no assistant turn and the tokenizer has no EOS token")
        return eos[0]

    def target_ids(self, answer: str) -> list[int]:
        """Tokens the router must emit to give `answer`: the answer's own tokens + the turn-end token.

        The answer is tokenised on its own (not across the prompt boundary), as generation emits it.
        """
        if answer not in self._target_cache:
            self._target_cache[answer] = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self.end_id]
        return self._target_cache[answer]

    def encode(self, problems: Sequence[Any]) -> PromptBatch:
        """Routing prompts (chat template, generation prompt on), truncated in the problem text, left-padded."""
        rows, ids = [], []
        for i, problem in enumerate(problems):
            pid = problem_id(problem, i)
            text = problem_text(problem)
            row = self._render(routing_messages(self.spec, text), generation_prompt=True)
            if len(row) > self.max_prompt_tokens:
                row = self._truncate(text, len(row), pid)
            rows.append(row)
            ids.append(pid)
        width = max(len(r) for r in rows)
        device = self.device
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return PromptBatch(input_ids.to(device), mask.to(device), ids)

    def _truncate(self, text: str, length: int, pid: str) -> list[int]:
        problem_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for _ in range(4):
            keep = len(problem_ids) - (length - self.max_prompt_tokens) - 4
            if keep <= 0:
                raise ValueError(
                    f"problem {pid}: routing prompt without the problem text is already {length - len(problem_ids)} "
                    f"tokens; raise router.max_prompt_tokens (now {self.max_prompt_tokens})"
                )
            problem_ids = problem_ids[:keep]
            text = self.tokenizer.decode(problem_ids) + " [...]"
            row = self._render(routing_messages(self.spec, text), generation_prompt=True)
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

    def forward_prompt(self, batch: PromptBatch) -> PromptState:
        """Run the prompts once; keep hidden states, first-token logits and the KV cache."""
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.autocast():
            out = self.model.get_decoder()(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            hidden = out.last_hidden_state  # (B, T, d)
            next_logits = self.model.get_output_embeddings()(hidden[:, -1]).float()  # (B, V)
        past = [(layer.keys, layer.values) for layer in cache.layers]
        return PromptState(hidden, mask, mask.sum(-1), next_logits, past)

    def score(self, state: PromptState, owner: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Summed log-probs (N,) of target token rows, row n continuing prompt `owner[n]`, in one batched pass."""
        token_lp, mask = self.token_log_probs(state, owner, targets)
        return torch.where(mask, token_lp, 0.0).sum(-1)

    def token_log_probs(
        self, state: PromptState, owner: torch.Tensor, targets: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (N, W) of right-padded target rows and their mask (N, W), teacher-forced."""
        n, width = len(targets), max(len(t) for t in targets)
        device = state.next_logits.device
        tgt = torch.full((n, width), self.pad_id, dtype=torch.long)
        tmask = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(targets):
            tgt[i, : len(row)] = torch.tensor(row)
            tmask[i, : len(row)] = 1
        tgt, tmask = tgt.to(device), tmask.to(device)
        first = state.next_logits[owner]  # (N, V)
        logits = first.unsqueeze(1)
        if width > 1:
            # Gathering rows copies the prompt cache per target; the prompt itself is not recomputed.
            cache = DynamicCache(ddp_cache_data=[(k[owner], v[owner]) for k, v in state.past])
            mask = torch.cat([state.attention_mask[owner], tmask[:, :-1]], dim=1)
            positions = state.lengths[owner].unsqueeze(1) + torch.arange(width - 1, device=device)
            with self.autocast():
                out = self.model.get_decoder()(
                    input_ids=tgt[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                rest = self.model.get_output_embeddings()(out.last_hidden_state).float()  # (N, W-1, V)
            logits = torch.cat([logits, rest], dim=1)  # (N, W, V)
        token_lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (N, W)
        return token_lp, tmask.bool()

    # ------------------------------------------------------------------ the policy

    def assignment_log_probs(self, state: PromptState) -> torch.Tensor:
        """Exact log π(z|x) for every z in `spec.assignments()`: (B, |Z|), each row log-sums to 0."""
        if not self.exact:
            raise ValueError(
                f"|Z| = {self.spec.num_assignments} exceeds router.max_exact_assignments; "
                "exact probabilities are not enumerated (sample by generation instead)"
            )
        zs = self.spec.assignments()
        batch = state.next_logits.shape[0]
        targets = [self.target_ids(self.spec.canonical_json(z)) for z in zs] * batch
        owner = torch.arange(batch, device=state.next_logits.device).repeat_interleave(len(zs))
        raw = self.score(state, owner, targets).view(batch, len(zs))
        return raw.log_softmax(dim=-1)

    def log_prob_of(self, state: PromptState, zs: Sequence[Sequence[int]]) -> torch.Tensor:
        """log π(z_b|x_b) for given assignments: (B,), differentiable."""
        if self.exact:
            table = self.assignment_log_probs(state)
            index = torch.tensor([self.spec.index(z) for z in zs], device=table.device)
            return table.gather(1, index.unsqueeze(1)).squeeze(1)
        targets = [self.target_ids(self.spec.canonical_json(z)) for z in zs]
        return self.score(state, torch.arange(len(zs), device=state.next_logits.device), targets)

    def decide(
        self, batch: PromptBatch, state: PromptState, mode: str = "sample", seed: int | None = None
    ) -> list[Decision]:
        """Pick z per problem: `sample` from π (seeded), or `greedy` (argmax of π; greedy decoding above the exact limit)."""
        if mode not in ("sample", "greedy"):
            raise ValueError(f"mode must be 'sample' or 'greedy', got {mode!r}")
        generator = self.rng if seed is None else torch.Generator().manual_seed(seed)
        if self.exact:
            table = self.assignment_log_probs(state)
            if mode == "greedy":
                picks = table.argmax(dim=-1).tolist()
            else:
                picks = torch.multinomial(table.detach().float().exp().cpu(), 1, generator=generator).squeeze(1).tolist()
            zs = self.spec.assignments()
            return [Decision(zs[j], table[b, j]) for b, j in enumerate(picks)]
        generations = self._decode(batch, state, greedy=mode == "greedy", generator=generator)
        zs = [g.z if g.z is not None else self._uniform_assignment(generator) for g in generations]
        log_probs = self.log_prob_of(state, zs)
        return [Decision(z, log_probs[b], g.z is None, g.text) for b, (z, g) in enumerate(zip(zs, generations))]

    def _uniform_assignment(self, generator: torch.Generator) -> tuple[int, ...]:
        """The fallback for an unreadable answer: every role's candidate drawn uniformly (seeded)."""
        draws = torch.randint(self.spec.num_candidates, (self.spec.num_roles,), generator=generator)
        return tuple(int(i) for i in draws)

    @torch.no_grad()
    def _decode(
        self, batch: PromptBatch, state: PromptState, greedy: bool, generator: torch.Generator, max_new_tokens: int | None = None
    ) -> list[GeneratedAssignment]:
        """Decode answers from the shared prompt cache (temperature 1, no top-k/top-p: the policy itself)."""
        steps = max_new_tokens or self.max_new_tokens
        size = state.next_logits.shape[0]
        device = state.next_logits.device
        cache = DynamicCache(ddp_cache_data=[(k.detach(), v.detach()) for k, v in state.past])
        mask, positions = state.attention_mask, state.lengths.clone()
        logits = state.next_logits.detach()
        stop = torch.tensor(sorted(self.stop_ids), device=device)
        tokens: list[list[int]] = [[] for _ in range(size)]
        logprobs: list[list[float]] = [[] for _ in range(size)]
        finished = torch.zeros(size, dtype=torch.bool, device=device)
        for _ in range(steps):
            logits = logits.float()
            # logits - logsumexp, not log_softmax: on CPU fp32 log_softmax over a 50k vocabulary is off by ~1e-4.
            logp = logits - logits.logsumexp(-1, keepdim=True)  # (B, V)
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(device)
            chosen = logp.gather(1, nxt.unsqueeze(1)).squeeze(1)
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
                    past_key_values=cache, use_cache=True,
                )
                logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1])
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
        batch = self.encode(problems)
        return self.decide(batch, self.forward_prompt(batch), "sample", seed)

    def greedy(self, problems: Sequence[Any]) -> list[Decision]:
        batch = self.encode(problems)
        return self.decide(batch, self.forward_prompt(batch), "greedy")

    def log_probs(self, problems: Sequence[Any]) -> torch.Tensor:
        """Exact (B, |Z|) table of log π(z|x)."""
        return self.assignment_log_probs(self.forward_prompt(self.encode(problems)))

    def log_prob(self, problems: Sequence[Any], zs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B,) log π(z_b|x_b) with gradients into the backbone."""
        if len(zs) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(zs)} assignments")
        return self.log_prob_of(self.forward_prompt(self.encode(problems)), zs)

    def generate(
        self, problems: Sequence[Any], greedy: bool = True, seed: int | None = None, max_new_tokens: int | None = None
    ) -> list[GeneratedAssignment]:
        """Free generation (inspection, serving, large |Z|): text, tokens, log-probs and the tolerant parse."""
        batch = self.encode(problems)
        generator = self.rng if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            state = self.forward_prompt(batch)
        return self._decode(batch, state, greedy, generator, max_new_tokens)

    def target_log_probs(self, problems: Sequence[Any], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (summed log-prob (B,), target token count (B,)) of given answers, e.g. canonical JSON.

        The SFT loss is `-(sum / count)` averaged over the batch: cross-entropy on the answer tokens only.
        """
        if len(answers) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(answers)} targets")
        state = self.forward_prompt(self.encode(problems))
        targets = [self.target_ids(a) for a in answers]
        owner = torch.arange(len(targets), device=state.next_logits.device)
        counts = torch.tensor([len(t) for t in targets], device=state.next_logits.device)
        return self.score(state, owner, targets), counts
