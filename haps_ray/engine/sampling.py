"""Choosing the next token (greedy, or temperature + nucleus through transformers' logits warpers) and stop strings.

    tokens = pick_tokens(logits, temperature=1.0, top_p=0.9, generator=g)    # logits (b, V) -> (b,)
    stops = StopStrings(tokenizer, ["\\nObservation:"])
    stops.hit(token_ids); stops.cut(text)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, TemperatureLogitsWarper, TopPLogitsWarper


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax when temperature == 0, else a draw from softmax(logits / T) restricted to the
    top_p nucleus (rows drawn in order from `generator`)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class StopStrings:
    """Stop strings of one generate call: which samples completed one, and their text cut before it.

    A stop string may end inside a token or span several, so the check decodes the tail of the sample: a token
    decodes to at least one character except special and partial-byte tokens, so a tail as long as the longest
    stop string plus a few tokens holds any stop string the last token can have completed.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] | None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.window = max((len(s) for s in self.stops), default=0) + 4

    def hit(self, tokens: Sequence[int]) -> bool:
        """True once the decoded tokens contain a stop string in their tail."""
        if not self.stops:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def text(self, tokens: Sequence[int]) -> str:
        """The decoded sample (special tokens skipped), cut before its first stop string."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        return text[: min(cuts)] if cuts else text
