"""F1/EM against hand-computed cases, MMLU accuracy, shaping, cost accounting and the frozen normaliser."""

import json

import pytest

from haps_ray.config import CandidateConfig
from haps_ray.rl.cost import CostNormalizer, PriceTable, TokenCounts
from haps_ray.rl.rewards import (
    choice_accuracy,
    combine_reward,
    exact_match,
    f1_score,
    normalize_answer,
    shape_performance,
    task_performance,
)


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an Apple, a day!  ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theater of the absurd", "theater of absurd"),  # "the" only as a whole word
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# expected values computed by hand from token overlaps: F1 = 2PR / (P + R)
F1_CASES = [
    ("Barack Obama", "Barack Obama", 1.0),
    ("the Barack Obama", "Barack Obama.", 1.0),  # article and punctuation dropped
    ("Obama", "Barack Obama", 2 * 1.0 * 0.5 / 1.5),  # P=1, R=1/2
    ("Barack Hussein Obama", "Barack Obama", 2 * (2 / 3) * 1.0 / (2 / 3 + 1)),  # P=2/3, R=1
    ("New York City", "Chicago", 0.0),
    ("yes", "yes", 1.0),
    ("Yes.", "yes", 1.0),
    ("yes", "no", 0.0),
    ("yes it is", "yes", 0.0),  # gold is yes/no: anything but exactly "yes" scores 0
    ("no", "no way out", 0.0),  # prediction is yes/no but gold is not
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
    ("", "", 0.0),  # no tokens, no overlap
    ("the the a", "an", 0.0),  # both normalise to nothing
    ("1,000 people", "1000 people", 1.0),  # punctuation inside numbers is dropped too
]


@pytest.mark.parametrize("pred, gold, expected", F1_CASES)
def test_f1_table(pred, gold, expected):
    assert f1_score(pred, gold) == pytest.approx(expected)


@pytest.mark.parametrize("pred, gold, expected", [
    ("The Beatles", "Beatles", 1.0),
    ("beatles!", "The Beatles", 1.0),
    ("Beatles band", "Beatles", 0.0),
    ("", "", 1.0),
    ("yes", "Yes", 1.0),
])
def test_exact_match_table(pred, gold, expected):
    assert exact_match(pred, gold) == expected


def test_repeated_tokens_count_once_per_match():
    # pred "a b b" vs gold "b": common = min(2, 1) = 1 -> P = 1/3, R = 1 -> F1 = 0.5
    assert f1_score("x b b", "b") == pytest.approx(0.5)


def test_mmlu_accuracy_and_dispatch():
    assert choice_accuracy("c", "C") == 1.0
    assert choice_accuracy("B", "C") == 0.0
    assert choice_accuracy(None, "C") == 0.0
    assert task_performance("mmlu", "A", "A") == 1.0
    assert task_performance("hotpotqa", "Obama", "Barack Obama") == pytest.approx(2 / 3)
    assert task_performance("hotpotqa", "Obama", "Barack Obama", metric="em") == 0.0
    assert task_performance("hotpotqa", None, "Paris") == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        task_performance("gsm8k", "1", "1")
    with pytest.raises(ValueError, match="metric"):
        task_performance("hotpotqa", "a", "a", metric="rouge")


def test_shaping_and_combined_reward():
    assert shape_performance(0.0, True) == -1.0
    assert shape_performance(0.0, False) == 0.0
    assert shape_performance(0.4, True) == 0.4
    assert combine_reward(0.8, None, lam=0.0) == 0.8
    assert combine_reward(0.8, 0.5, lam=0.2) == pytest.approx(0.8 * 0.8 - 0.2 * 0.5)
    assert combine_reward(0.0, 0.25, lam=0.5, shaping=True) == pytest.approx(0.5 * -1.0 - 0.5 * 0.25)
    with pytest.raises(ValueError, match="CostNormalizer"):
        combine_reward(1.0, None, lam=0.5)
    with pytest.raises(ValueError, match="lambda"):
        combine_reward(1.0, 0.0, lam=1.5)


def test_token_counts_and_prices():
    tokens = TokenCounts()
    tokens.add("student", "small", 100, 20)
    tokens.add("teacher", "large", 300, 50)
    tokens.add("student", "small", 120, 30)
    assert tokens.by_role == {"student": {"in": 220, "out": 50}, "teacher": {"in": 300, "out": 50}}
    assert tokens.by_engine == {"small": {"in": 220, "out": 50}, "large": {"in": 300, "out": 50}}
    assert (tokens.total_in, tokens.total_out) == (520, 100)
    assert TokenCounts.from_dict(json.loads(json.dumps(tokens.to_dict()))) == tokens
    prices = PriceTable.from_candidates([
        CandidateConfig(name="small", model="tiny-llama", price_in=0.2, price_out=0.2),
        CandidateConfig(name="large", model="tiny-qwen2", price_in=0.8, price_out=1.6),
    ])
    expected = (220 * 0.2 + 50 * 0.2 + 300 * 0.8 + 50 * 1.6) / 1e6
    assert prices.episode_cost(tokens) == pytest.approx(expected)
    with pytest.raises(KeyError, match="no price for engine 'huge'"):
        prices.call_cost("huge", 1, 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        PriceTable({"x": (-1.0, 0.0)})


def test_normalizer_fit_freeze_save_load(tmp_path):
    norm = CostNormalizer.fit([2e-5, 6e-5, 4e-5])
    assert (norm.low, norm.high) == (2e-5, 6e-5)
    assert norm(4e-5) == pytest.approx(0.5)
    assert norm(1e-5) == 0.0 and norm(9e-5) == 1.0  # valid/test costs outside the train range are clipped
    assert CostNormalizer(2e-5, 6e-5, clip=False)(8e-5) == pytest.approx(1.5)
    assert CostNormalizer.fit([3.0, 3.0])(7.0) == 0.0  # degenerate range
    path = tmp_path / "norm.json"
    norm.save(path)
    loaded = CostNormalizer.load(path)
    assert loaded == norm and loaded(5e-5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no costs"):
        CostNormalizer.fit([])
    with pytest.raises(ValueError, match="finite"):
        CostNormalizer.fit([1.0, float("nan")])
    with pytest.raises(FileNotFoundError, match="fit it on the train split"):
        CostNormalizer.load(tmp_path / "missing.json")
