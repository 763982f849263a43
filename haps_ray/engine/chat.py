"""ChatEncoder: chat template -> token ids with exactly one BOS, the model's end tokens, and left padding.

One encoder serves every model that reads chats here: the frozen engines and the router.

    encoder = ChatEncoder(tokenizer, model.generation_config)
    ids = encoder.encode(messages)                          # templated once, generation prompt on
    input_ids, mask, positions = encoder.left_pad([ids_a, ids_b], device)

Conventions: the chat template is applied once (`add_generation_prompt=True` unless asked otherwise) and the
templated text is tokenized without special tokens, so the prompt holds exactly the template's BOS; a tokenizer
that prepends BOS by default but whose template lacks it gets one BOS prepended. `eos_ids` are the tokenizer's EOS
plus the generation config's; `pad_id` fills left padding (the tokenizer's pad token, else the smallest EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


class ChatEncoder:
    """Templating, BOS/EOS handling and left padding for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, generation_config: Any = None, name: str = "model") -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name}: tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.name = name
        self.eos_ids = self._eos_ids(generation_config)
        configured = getattr(generation_config, "eos_token_id", None)
        configured = configured if configured is not None else tokenizer.eos_token_id
        self.primary_eos = configured if isinstance(configured, int) else list(configured)[0]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        bos = tokenizer.bos_token_id
        plain = tokenizer("a", add_special_tokens=True)["input_ids"]
        self._bos_to_add = bos if bos is not None and plain and plain[0] == bos else None

    def _eos_ids(self, generation_config: Any) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
            if source is not None:
                ids.update([source] if isinstance(source, int) else source)
        if not ids:
            raise ValueError(f"{self.name}: neither tokenizer nor generation config defines an EOS token")
        return ids

    def template(self, messages: Messages, generation_prompt: bool = True) -> str:
        """The chat as the template renders it (text, not tokens)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (completions, answers)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, messages: Messages, where: str = "messages", generation_prompt: bool = True) -> list[int]:
        """Token ids of the templated chat (ending with the assistant generation prompt); exactly one BOS."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: expected a non-empty list of chat messages, got {type(messages).__name__}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}[{j}]: a message needs string 'role' and 'content', got {m!r:.80}")
        ids = self.tokens(self.template(messages, generation_prompt))
        if self._bos_to_add is not None and (not ids or ids[0] != self._bos_to_add):
            ids.insert(0, self._bos_to_add)
        return ids

    def encode_all(self, messages: Sequence[Messages]) -> list[list[int]]:
        return [self.encode(m, where=f"messages[{i}]") for i, m in enumerate(messages)]

    def turn_end_id(self, messages: Messages, answer: str) -> int:
        """The token the template writes right after an assistant `answer` to `messages` (it ends the turn),
        or the primary EOS (the generation config's first) when the template closes nothing."""
        prompt = self.template(messages, generation_prompt=True)
        full = self.template(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
        if not full.startswith(prompt + answer):
            raise ValueError(f"{self.name}: chat template: a rendered answer does not follow its generation prompt verbatim")
        after = self.tokens(full[len(prompt + answer):])
        return after[0] if after else self.primary_eos

    def left_pad(
        self, seqs: Sequence[Sequence[int]], device: torch.device | str, starts: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids), each (b, width), left padded with `pad_id`; positions count
        real tokens only, from `starts[i]` for sequence i (the length of a cached prefix it continues; default 0)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if len(s):
                ids[row, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
                mask[row, width - len(s):] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        if starts is not None:
            positions = positions + torch.tensor(list(starts), dtype=torch.long)[:, None] * mask
        return ids.to(device), mask.to(device), positions.to(device)
