"""Task performance (HotpotQA F1/EM, MMLU accuracy) and the cost-aware episode reward.

HotpotQA answers are compared after the SQuAD/HotpotQA normalisation: lower-case, drop punctuation,
drop the articles a/an/the, collapse whitespace. Token F1 follows the official HotpotQA script, including its
yes/no rule: when either side normalises to "yes", "no" or "noanswer", the two must be equal or F1 is 0.

The reward of an episode (paper §4.6):

    R = (1 - λ) · Perf' - λ · Ĉ      Perf' = -1 if shaping and Perf == 0 else Perf

with Ĉ the min-max normalised episode cost (`haps_ray.rl.cost.CostNormalizer`).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised answers (HotpotQA official rules, yes/no included)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # "yes"/"no"/"noanswer" are classes, not text: partial overlap with them earns nothing
    if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def choice_accuracy(prediction: str | None, gold: str) -> float:
    """MMLU: 1.0 when the predicted letter equals the key (case-insensitive), else 0.0 (None scores 0)."""
    if not prediction:
        return 0.0
    return float(prediction.strip().upper() == gold.strip().upper())


def task_performance(task: str, prediction: str | None, gold: str, metric: str = "f1") -> float:
    """Perf of one episode: HotpotQA F1 (or EM with metric='em'), MMLU accuracy."""
    if task == "mmlu":
        return choice_accuracy(prediction, gold)
    if task == "hotpotqa":
        if metric == "em":
            return exact_match(prediction or "", gold)
        if metric == "f1":
            return f1_score(prediction or "", gold)
        raise ValueError(f"unknown HotpotQA metric {metric!r} (use 'f1' or 'em')")
    raise ValueError(f"unknown task {task!r} (use 'hotpotqa' or 'mmlu')")


def shape_performance(perf: float, shaping: bool) -> float:
    """Paper shaping: a complete miss (Perf == 0) is punished with -1; otherwise Perf is kept."""
    if shaping and perf == 0:
        return -1.0
    return perf


def combine_reward(perf: float, cost_norm: float | None, lam: float, shaping: bool = False) -> float:
    """R = (1 - λ)·Perf' - λ·Ĉ. `cost_norm` may be None only when λ == 0 (no cost term)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    shaped = shape_performance(perf, shaping)
    if lam == 0.0:
        return shaped
    if cost_norm is None:
        raise ValueError(f"lambda={lam} needs a normalised cost; fit a CostNormalizer on the train split first")
    return (1.0 - lam) * shaped - lam * cost_norm
