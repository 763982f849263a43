"""The HAPS paper's published numbers (arXiv 2601.05903, section 4), to print beside ours.

Performance is in percent (token F1 on HotpotQA, accuracy on MMLU) as the paper prints it; the cost table (RQ5)
keeps the paper's units: perf as a fraction, cost min-max normalised, reward = perf - lambda * cost. Where the
extracted text lost a figure's values, only what the text states is here (RQ3, RQ4 and RQ6 are figures).
"""

from __future__ import annotations

OPEN_PAIRS = ("L-Q", "M-Q", "L-M")
MIXED_PAIRS = ("L-G", "Q-D")
PAIR_MODELS = {
    "L-Q": ("Llama-3.1-8B-Instruct", "Qwen2.5-7B-Instruct"),
    "M-Q": ("Mistral-7B-Instruct-v0.3", "Qwen2.5-7B-Instruct"),
    "L-M": ("Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.3"),
    "L-G": ("Llama-3.1-8B-Instruct", "GPT-4.1 Nano"),
    "Q-D": ("Qwen2.5-7B-Instruct", "DeepSeek V3"),
}


def _by_pair(hotpotqa: tuple[float, ...], mmlu: tuple[float, ...]) -> dict[str, dict[str, float]]:
    return {"hotpotqa": dict(zip(OPEN_PAIRS, hotpotqa)), "mmlu": dict(zip(OPEN_PAIRS, mmlu))}


# Table 2 (RQ1): method -> task -> pair -> perf (%).
TABLE2 = {
    "Random": _by_pair((38.94, 11.44, 23.26), (71, 65, 67)),
    "RouteLLM": _by_pair((40.67, 36.10, 38.95), (79, 74, 69)),
    "GraphRouter": _by_pair((41.31, 23.07, 26.75), (71, 67, 67)),
    "IRTRouter": _by_pair((37.34, 34.09, 38.92), (74, 77, 73)),
    "HAPS": _by_pair((43.16, 39.70, 40.58), (79, 78, 74)),
}

# Table 3 (RQ2): variant -> task -> pair -> perf (%). "Left"/"Right" are the pair's first/second model.
TABLE3 = {
    "w/o High-Level (Random)": _by_pair((40.13, 26.37, 25.44), (72, 68, 61)),
    "w/o High-Level (Fixed): Teacher=Left, Student=Left": _by_pair((38.48, 11.55, 37.84), (70, 62, 69)),
    "w/o High-Level (Fixed): Teacher=Right, Student=Right": _by_pair((34.23, 35.51, 7.10), (78, 76, 60)),
    "w/o High-Level (Fixed): Teacher=Left, Student=Right": _by_pair((34.06, 32.25, 8.89), (70, 78, 71)),
    "w/o High-Level (Fixed): Teacher=Right, Student=Left": _by_pair((42.45, 9.54, 35.04), (69, 61, 61)),
    "w/o Low-Level Router": _by_pair((33.93, 33.67, 36.32), (70, 70, 68)),
    "HAPS": _by_pair((43.16, 39.70, 40.58), (79, 78, 74)),
}

# RQ3 (Figure 3), as the text states it: the largest drop of HAPS w/o parameter sharing below HAPS (points).
RQ3_MAX_DROP = {"hotpotqa": 4.33, "mmlu": 6.00}

# RQ4 (Figure 4, HotpotQA): the values the text gives. The figure's other points are not in the extracted text.
RQ4_TEXT = {"M-Q": "32.90% at the shallowest depth, rising monotonically to 39.71% at the deepest",
            "L-Q": "inverted U, peak +1.23 points over k=1"}

# RQ5 cost table (HotpotQA, Llama-3.1-8B + Qwen2.5-14B): method -> lambda -> (perf, normalised cost, reward).
COST_TABLE = {
    "All Weak": {0.2: (0.3458, 0.0923, 0.2582), 0.5: (0.3458, 0.0923, 0.1267), 0.8: (0.3458, 0.0923, -0.0047)},
    "All Strong": {0.2: (0.3697, 0.3362, 0.2285), 0.5: (0.3697, 0.3362, 0.0168), 0.8: (0.3697, 0.3362, -0.1950)},
    "Random": {0.2: (0.3433, 0.2160, 0.2314), 0.5: (0.3433, 0.2160, 0.0636), 0.8: (0.3433, 0.2160, -0.1042)},
    "RouteLLM": {0.2: (0.4335, 0.2111, 0.3046), 0.5: (0.3558, 0.0939, 0.1310), 0.8: (0.3458, 0.0923, -0.0047)},
    "GraphRouter": {0.2: (0.3458, 0.0923, 0.2582), 0.5: (0.3458, 0.0923, 0.1267), 0.8: (0.3458, 0.0923, -0.0047)},
    "IRT-Router": {0.2: (0.4299, 0.1377, 0.3164), 0.5: (0.3604, 0.0921, 0.1341), 0.8: (0.3552, 0.0881, 0.0005)},
    "HAPS": {0.2: (0.4194, 0.0886, 0.3178), 0.5: (0.3709, 0.0857, 0.1426), 0.8: (0.4181, 0.0861, 0.0148)},
}
COST_LAMBDAS = (0.2, 0.5, 0.8)

# RQ6 (Figure 5, HotpotQA F1 %), as the text states it: HAPS on both mixed pairs; RouteLLM (the strongest
# baseline) on L-G is 3.45 points below HAPS.
FIGURE5 = {"HAPS": {"L-G": 47.19, "Q-D": 58.52}, "RouteLLM": {"L-G": 47.19 - 3.45}}
