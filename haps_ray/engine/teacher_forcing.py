"""Teacher forcing through a frozen model with per-sample adapters: completion log-probs, and their adapter gradients.

    tf = TeacherForcing(model, encoder, max_batch_size=32)
    logps = tf.score(prompts, completions, adapters)                    # list of per-token log-probs
    grads = tf.adapter_grads(prompts, completions, adapters, weights)   # per sample (dA, dB)

A completion is token ids (as `Generation.token_ids`) or text (tokenized without special tokens). One forward over
prompt + completion gives the decoder's hidden states; the LM head runs only over the positions that predict
completion tokens, through `haps_ray.engine.logprobs.head_log_probs` (in row chunks, recomputed in backward), so
no (batch, positions, vocabulary) logits tensor of the whole batch is kept. For RL the engine returns d(w_i · Σ_t log p(y_t)) / d(A_i, B_i): the model's weights are
frozen and get no gradient, and because samples do not interact, one backward of Σ_i w_i Σ_t log p gives every
sample its own gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from haps_ray.engine.chat import ChatEncoder
from haps_ray.engine.generator import chunks
from haps_ray.engine.logprobs import Nucleus, head_log_probs
from haps_ray.lora import Adapter, use_adapters

Completion = list[int] | str


class TeacherForcing:
    """`score` and `adapter_grads` for one model, in chunks of at most `max_batch_size` samples."""

    def __init__(self, model: PreTrainedModel, encoder: ChatEncoder, max_batch_size: int = 32) -> None:
        self.model = model
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device

    def completion_ids(self, completions: Sequence[Completion]) -> list[list[int]]:
        out = []
        for i, c in enumerate(completions):
            if isinstance(c, str):
                out.append(self.encoder.tokens(c))
            elif isinstance(c, (list, tuple)) and all(isinstance(t, int) for t in c):
                out.append(list(c))
            else:
                raise ValueError(f"completions[{i}]: expected token ids (list[int]) or text, got {type(c).__name__}")
        return out

    def _log_probs(
        self, prompts: list[list[int]], completions: list[list[int]], adapters: Sequence[Adapter | None],
        nucleus: Nucleus | None = None,
    ) -> torch.Tensor:
        """log p(y_t | prompt, y_<t) of every completion token, flattened sample by sample: (Σ len(c),) float32;
        under the full softmax, or with `nucleus` under the renormalised nucleus sampling drew from."""
        longest = max(len(c) for c in completions)
        if longest == 0:
            return torch.zeros(0, device=self.device)
        input_ids, mask, positions = self.encoder.left_pad([p + c for p, c in zip(prompts, completions)], self.device)
        with use_adapters(self.model, adapters):
            hidden = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
            ).last_hidden_state  # (b, width, d)
        # Completions are right-aligned under left padding: the last longest + 1 positions predict them all (the very
        # last one predicts nothing and gets a dummy target). The head runs over that (b, longest + 1) slab.
        slab = hidden[:, -longest - 1:]  # (b, longest + 1, d)
        targets = torch.cat([input_ids[:, -longest:], input_ids.new_zeros(len(prompts), 1)], dim=1)  # (b, longest + 1)
        logp = head_log_probs(slab.reshape(-1, slab.shape[-1]), self.model.get_output_embeddings(), targets.reshape(-1),
                              nucleus=nucleus)
        logp = logp.view(len(prompts), longest + 1)[:, :-1]
        return torch.cat([logp[row, longest - len(c):] for row, c in enumerate(completions)])

    @torch.inference_mode()
    def score(
        self, prompts: list[list[int]], completions: Sequence[Completion], adapters: Sequence[Adapter | None],
        nucleus: Nucleus | None = None,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion after its prompt (full softmax, or the given nucleus)."""
        comps = self._check(prompts, completions, adapters)
        out: list[list[float]] = []
        for part in chunks(len(prompts), self.max_batch_size):
            flat = self._log_probs(prompts[part], comps[part], adapters[part], nucleus).tolist()
            start = 0
            for c in comps[part]:
                out.append(flat[start:start + len(c)])
                start += len(c)
        return out

    def adapter_grads(
        self,
        prompts: list[list[int]],
        completions: Sequence[Completion],
        adapters: Sequence[Adapter],
        weights: Sequence[float],
        nucleus: Nucleus | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample (dA, dB) = d(w_i · Σ_t log p(y_t)) / d(A_i, B_i), by one forward/backward per chunk; the tensors
        have the shapes, dtype and device of the given factors. log p is under the full softmax, or with `nucleus`
        under the renormalised nucleus the rollouts were sampled from (`rl.logprob_support`)."""
        comps = self._check(prompts, completions, adapters)
        if len(weights) != len(prompts):
            raise ValueError(f"{len(weights)} weights for {len(prompts)} samples")
        for i, ad in enumerate(adapters):
            if not isinstance(ad, Adapter):
                raise ValueError(f"adapters[{i}]: adapter_grads needs an Adapter per sample, got {type(ad).__name__}")
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for part in chunks(len(prompts), self.max_batch_size):
            # fresh leaves (clone: the caller's tensors may be inference tensors, which cannot require grad)
            leaves = [
                Adapter(a.A.detach().to(self.device).clone().requires_grad_(True),
                        a.B.detach().to(self.device).clone().requires_grad_(True), a.alpha)
                for a in adapters[part]
            ]
            with torch.enable_grad():
                logp = self._log_probs(prompts[part], comps[part], leaves, nucleus)
                per_token = torch.tensor([w for w, c in zip(weights[part], comps[part]) for _ in c],
                                         dtype=logp.dtype, device=self.device)
                objective = (per_token * logp).sum()
                inputs = [t for leaf in leaves for t in (leaf.A, leaf.B)]
                grads = torch.autograd.grad(objective, inputs, allow_unused=True) if objective.requires_grad else [None] * len(inputs)
            for j, given in enumerate(adapters[part]):
                dA, dB = grads[2 * j], grads[2 * j + 1]
                dA = torch.zeros_like(given.A) if dA is None else dA.to(device=given.A.device, dtype=given.A.dtype)
                dB = torch.zeros_like(given.B) if dB is None else dB.to(device=given.B.device, dtype=given.B.dtype)
                out.append((dA, dB))
        return out

    def _check(self, prompts: list[list[int]], completions: Sequence[Completion], adapters: Sequence[Adapter | None]) -> list[list[int]]:
        if len(completions) != len(prompts):
            raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts")
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} samples")
        return self.completion_ids(completions)
