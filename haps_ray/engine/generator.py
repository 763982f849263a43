"""The decode loop: one batch of prompts, each row with its own adapter, until every row stops.

    generator = Generator(model, encoder, prefiller, ragged=True)
    gens = generator.generate(prompts, adapters, max_new_tokens=64, temperature=1.0, top_p=0.9, stop=None, seed=0)

Outputs (`Generation`): `token_ids` are the tokens the model emitted, up to and including the one that ended the
sample (EOS, or the token completing a stop string); `logprobs` align with them under the model's untempered,
unfiltered distribution (log_softmax of the raw logits) whatever temperature/top_p sampled the token, so teacher
forcing reproduces them. `text` is the decoded output without special tokens, cut before the first stop string;
`finish_reason` is "stop" (EOS or stop string) or "length" (max_new_tokens reached).

How a batch decodes: the `Prefiller` returns the prompts' KV in a cache whose full-attention layers keep room for
`max_new_tokens` (each step writes in place); rows that finish leave the batch (their cache rows moved up in place,
their adapter rows dropped). Rows decode longest prompt first, and with `ragged` an SDPA model attends in runs of
rows of similar length (`haps_ray.engine.ragged`), so a short prompt does not read the padding up to the longest
one. Temperature 0 is greedy; otherwise draws come from a `torch.Generator` seeded by `seed`, row by row in that
decode order. Calls run in chunks of at most `max_batch_size` samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from haps_ray.engine.chat import ChatEncoder
from haps_ray.engine.logprobs import selective_log_softmax
from haps_ray.engine.prefill import Prefiller
from haps_ray.engine.ragged import row_spans
from haps_ray.engine.sampling import StopStrings, pick_tokens
from haps_ray.lora import Adapter, select_adapter_rows, use_adapters


@dataclass
class Generation:
    """One sample's output of a generate call (see the module docstring for the conventions)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    n_input_tokens: int
    n_output_tokens: int
    finish_reason: str  # "stop" | "length" | "error" (an API call that failed after its retries)
    error: str | None = None  # why the call failed (API engines): the episode records it as a malformed turn
    error_kind: str | None = None  # haps_ray.tasks.protocol.ErrorKind value of that failure
    tokens_estimated: bool = False  # token counts are estimates (an API reply without usage, no tokenizer)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class Generator:
    """Batched decoding with per-sample adapters over one model."""

    def __init__(self, model: PreTrainedModel, encoder: ChatEncoder, prefiller: Prefiller, ragged: bool,
                 max_batch_size: int = 32) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.encoder = encoder
        self.prefiller = prefiller
        self.ragged = ragged
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device

    def generate(
        self,
        prompts: Sequence[list[int]],
        adapters: Sequence[Adapter | None],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """Decode every tokenized prompt with its own adapter (None = the base model)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} samples")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt")
        prompts = [list(p) for p in prompts]
        stops = StopStrings(self.encoder.tokenizer, stop)
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        out: list[Generation] = []
        for part in chunks(len(prompts), self.max_batch_size):
            out += self._generate_chunk(prompts[part], list(adapters[part]), max_new_tokens, temperature, top_p, stops, generator)
        return out

    @torch.inference_mode()
    def _generate_chunk(
        self,
        prompts: list[list[int]],
        adapters: list[Adapter | None],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stops: StopStrings,
        generator: torch.Generator | None,
    ) -> list[Generation]:
        n = len(prompts)
        # rows decode longest prompt first, so that rows of similar length are neighbours (`row_spans`)
        active = sorted(range(n), key=lambda i: -len(prompts[i]))  # original index of each row still decoding
        emitted: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        rows_prompts, rows_adapters = [prompts[i] for i in active], [adapters[i] for i in active]
        _, mask, positions = self.encoder.left_pad(rows_prompts, self.device)
        cache, logits = self.prefiller.prefill(rows_prompts, rows_adapters, reserve=max_new_tokens - 1)
        eos = self.encoder.eos_ids
        with use_adapters(self.model, rows_adapters):
            next_pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                tokens = pick_tokens(logits, temperature, top_p, generator)
                chosen = selective_log_softmax(logits, tokens)
                keep = []
                for row, (tok, lp) in enumerate(zip(tokens.tolist(), chosen.tolist())):
                    i = active[row]
                    emitted[i].append(tok)
                    logprobs[i].append(lp)
                    if tok in eos or stops.hit(emitted[i]):
                        finish[i] = "stop"
                    else:
                        keep.append(row)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    select_adapter_rows(self.model, index)
                    mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                    active = [active[row] for row in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                spans = {"row_spans": row_spans([len(prompts[i]) + step + 1 for i in active])} if self.ragged else {}
                logits = self.model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                    cache=cache, use_cache=True, **spans,
                ).logits[:, -1].float()
                next_pos = next_pos + 1
        return [
            Generation(
                text=stops.text(emitted[i]),
                token_ids=emitted[i],
                logprobs=logprobs[i],
                n_input_tokens=len(prompts[i]),
                n_output_tokens=len(emitted[i]),
                finish_reason=finish[i],
            )
            for i in range(n)
        ]
