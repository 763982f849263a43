"""Parquet datasets, small files and checkpoint directories on local disk or S3, behind one URI API.

A location is a local path or an `s3://bucket/prefix` URI. S3 goes through `pyarrow.fs.S3FileSystem`;
the endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (e.g. a MinIO or moto server), the
region from `AWS_REGION` / `AWS_DEFAULT_REGION`, credentials from the usual AWS chain.

Commits are atomic: a reader never sees half a file.
- local: write `.<name>.tmp-<uuid>` in the target directory, then `os.replace` it onto the final name;
- S3: an object only becomes visible when its PUT (or multipart upload) completes, so a crash mid-write
  leaves no object behind.
Dataset readers skip names starting with `.` or `_`, so a stray local temp file is never read.

    write_table(table, "s3://bucket/run/D/split=train/part-00a1.parquet")
    table = read_dataset("s3://bucket/run/D", schema=D_SCHEMA, partition_field="split")
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_S3_CACHE: dict[tuple[str, str], pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A storage location is malformed, missing or unreadable; the message names the URI."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = (endpoint, region)
    with _S3_LOCK:
        if key not in _S3_CACHE:
            kwargs: dict = {"region": region}
            if endpoint:
                parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
                kwargs["endpoint_override"] = parsed.netloc
                kwargs["scheme"] = parsed.scheme
                # Custom endpoints (MinIO, moto) serve buckets by path, not by virtual host.
                kwargs["force_virtual_addressing"] = False
            _S3_CACHE[key] = pafs.S3FileSystem(**kwargs)
        return _S3_CACHE[key]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3://bucket/key URI."""
    uri = str(uri)
    if is_s3(uri):
        rest = uri[len("s3://"):].strip("/")
        if not rest:
            raise StorageError(f"{uri}: an s3 URI needs a bucket (s3://bucket/prefix)")
        return _s3_filesystem(), rest
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    """Create a local directory tree (S3 has no directories: a no-op there)."""
    if not is_s3(uri):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)


def _file_paths(fs: pafs.FileSystem, path: str, suffix: str) -> list[str]:
    """Paths (inside `fs`) of the files under `path` ending with `suffix`, skipping hidden/temp names."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [path]
    out = []
    for item in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if item.type != pafs.FileType.File or not item.base_name.endswith(suffix):
            continue
        if any(part.startswith((".", "_")) for part in posixpath.relpath(item.path, path).split("/")):
            continue
        out.append(item.path)
    return sorted(out)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files under `uri` (recursive) whose names end with `suffix`, skipping hidden/temp names."""
    fs, path = filesystem(uri)
    return [join(uri, posixpath.relpath(p, path)) if p != path else uri for p in _file_paths(fs, path, suffix)]


def delete(uri: str) -> None:
    """Delete one file or a whole directory/prefix (missing is fine)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _atomic_write(uri: str, write) -> None:
    fs, path = filesystem(uri)
    if is_s3(uri):
        write(fs, path)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        write(fs, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (replacing any existing file)."""

    def _write(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path) as out:
            out.write(data)

    _atomic_write(uri, _write)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_table(table: pa.Table, uri: str) -> None:
    """Write one Parquet file atomically."""

    def _write(fs: pafs.FileSystem, path: str) -> None:
        pq.write_table(table, path, filesystem=fs, compression="zstd")

    _atomic_write(uri, _write)


def read_table(uri: str) -> pa.Table:
    """Read one Parquet file."""
    fs, path = filesystem(uri)
    try:
        return pq.read_table(path, filesystem=fs)
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err


def read_dataset(
    uri: str,
    schema: pa.Schema | None = None,
    partition_field: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read every Parquet file under `uri` as one table.

    Args:
        schema: the full schema including the partition column (files are cast to it); None = inferred.
        partition_field: name of a hive partition directory level (`<field>=<value>/`), read as a string column.
        columns: subset of columns to read (None = all).
    Only `*.parquet` files are read (summaries and tables may sit next to them); hidden and `_` names are
    skipped. Returns an empty table with `schema` when nothing has been written yet.
    """
    fs, path = filesystem(uri)
    partitioning = None
    if partition_field:
        partitioning = pads.partitioning(pa.schema([(partition_field, pa.string())]), flavor="hive")
    files = _file_paths(fs, path, ".parquet")
    if not files:
        if schema is None:
            raise StorageError(f"{uri}: no Parquet files there and no schema to build an empty table")
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=schema, partitioning=partitioning,
                               partition_base_dir=path)
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: cannot read Parquet dataset: {err}") from err


def upload_dir(local_dir: str | Path, uri: str) -> int:
    """Copy a local directory tree (e.g. a checkpoint) to `uri`; returns the number of files copied.

    Each file is committed atomically; write a marker file last (see `write_text`) when a reader must
    know the whole directory is complete.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    count = 0
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        write_bytes(join(uri, *file.relative_to(local_dir).parts), file.read_bytes())
        count += 1
    return count


def download_dir(uri: str, local_dir: str | Path) -> int:
    """Copy every file under `uri` into `local_dir` (kept relative layout); returns the number of files."""
    files = list_files(uri)
    if not files:
        raise StorageError(f"{uri}: nothing to download")
    fs, root = filesystem(uri)
    local_dir = Path(local_dir)
    for file in files:
        _, path = filesystem(file)
        target = local_dir / posixpath.relpath(path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(file))
    return len(files)
