"""Storage: atomic commits, hive-partitioned Parquet datasets and directory copies, on local disk and on a
real S3 API (moto's server on loopback, through pyarrow's S3 filesystem)."""

import os

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from haps_ray import storage

SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("value", pa.float64())])


def part(split: str, keys: list[str], value: float) -> pa.Table:
    return pa.table({"key": keys, "value": [value] * len(keys)}, schema=pa.schema([("key", pa.string()), ("value", pa.float64())]))


def roundtrip(root: str) -> None:
    """The same checks against any root URI."""
    assert storage.read_dataset(root, schema=SCHEMA, partition_field="split").num_rows == 0
    storage.write_table(part("train", ["a", "b"], 1.0), storage.join(root, "split=train", "part-1.parquet"))
    storage.write_table(part("train", ["c"], 2.0), storage.join(root, "split=train", "part-2.parquet"))
    storage.write_table(part("valid", ["d"], 3.0), storage.join(root, "split=valid", "part-1.parquet"))
    table = storage.read_dataset(root, schema=SCHEMA, partition_field="split")
    rows = sorted((r["split"], r["key"], r["value"]) for r in table.to_pylist())
    assert rows == [("train", "a", 1.0), ("train", "b", 1.0), ("train", "c", 2.0), ("valid", "d", 3.0)]
    assert table.schema.names == SCHEMA.names
    files = storage.list_files(root, ".parquet")
    assert [f.rsplit("/", 2)[-2:] for f in files] == [
        ["split=train", "part-1.parquet"], ["split=train", "part-2.parquet"], ["split=valid", "part-1.parquet"]]
    # overwriting a file replaces it (a re-run batch does not add rows)
    storage.write_table(part("train", ["a", "b"], 9.0), storage.join(root, "split=train", "part-1.parquet"))
    assert storage.read_dataset(root, schema=SCHEMA, partition_field="split").num_rows == 4
    storage.write_text(storage.join(root, "summary.json"), '{"ok": true}')
    assert storage.read_text(storage.join(root, "summary.json")) == '{"ok": true}'
    assert storage.exists(storage.join(root, "summary.json"))
    assert not storage.exists(storage.join(root, "nothing.json"))
    with pytest.raises(storage.StorageError, match="nothing.json"):
        storage.read_text(storage.join(root, "nothing.json"))
    storage.delete(storage.join(root, "split=valid", "part-1.parquet"))
    assert storage.read_dataset(root, schema=SCHEMA, partition_field="split").num_rows == 3


def test_local_dataset_roundtrip(tmp_path):
    roundtrip(str(tmp_path / "D"))


def test_local_commit_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "D" / "split=train" / "part-1.parquet"
    storage.write_table(part("train", ["a"], 1.0), str(target))

    def crash(*args, **kwargs):
        raise RuntimeError("disk died mid-write")

    monkeypatch.setattr(storage.pq, "write_table", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        storage.write_table(part("train", ["b", "c"], 2.0), str(target))
    # the old file is intact and no temp file is left behind
    assert os.listdir(target.parent) == ["part-1.parquet"]
    assert storage.read_table(str(target)).column("key").to_pylist() == ["a"]


def test_hidden_and_temp_files_are_not_read(tmp_path):
    root = tmp_path / "D"
    storage.write_table(part("train", ["a"], 1.0), str(root / "split=train" / "part-1.parquet"))
    (root / "split=train" / ".part-2.parquet.tmp-123").write_bytes(b"half a file")
    assert storage.read_dataset(str(root), schema=SCHEMA, partition_field="split").num_rows == 1
    assert len(storage.list_files(str(root))) == 1


def test_bad_uris_name_themselves(tmp_path):
    with pytest.raises(storage.StorageError, match="gs://x"):
        storage.filesystem("gs://x/y")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.filesystem("s3://")
    corrupt = tmp_path / "D" / "split=train" / "part-1.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.read_dataset(str(tmp_path / "D"), schema=SCHEMA, partition_field="split")


def test_local_dir_copy(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (src / "sub" / "config.json").write_text("{}")
    assert storage.upload_dir(src, str(tmp_path / "copy")) == 2
    assert storage.download_dir(str(tmp_path / "copy"), tmp_path / "back") == 2
    assert (tmp_path / "back" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert (tmp_path / "back" / "sub" / "config.json").read_text() == "{}"


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server; returns its s3:// root."""
    name = f"haps-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def test_s3_dataset_roundtrip(bucket, s3_server):
    roundtrip(f"{bucket}/run/D")
    # the objects are real S3 objects, visible to any S3 client under the expected keys
    listing = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket[5:], Prefix="run/D/")
    # (pyarrow leaves an empty "directory" marker object when it deletes a prefix's last file)
    keys = sorted(obj["Key"] for obj in listing["Contents"] if not obj["Key"].endswith("/"))
    assert keys == ["run/D/split=train/part-1.parquet", "run/D/split=train/part-2.parquet", "run/D/summary.json"]


def test_s3_filesystem_uses_the_configured_endpoint(s3_server):
    fs, path = storage.filesystem("s3://some-bucket/prefix/x.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "some-bucket/prefix/x.parquet"
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes("s3://missing-bucket-xyz/nothing")


def test_s3_dir_copy(bucket, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(3000))
    (src / "sub" / "config.json").write_text('{"a": 1}')
    assert storage.upload_dir(src, f"{bucket}/ckpt/step-1") == 2
    assert storage.list_files(f"{bucket}/ckpt/step-1") == [f"{bucket}/ckpt/step-1/model.safetensors",
                                                          f"{bucket}/ckpt/step-1/sub/config.json"]
    assert storage.download_dir(f"{bucket}/ckpt/step-1", tmp_path / "back") == 2
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (tmp_path / "back" / "sub" / "config.json").read_text() == '{"a": 1}'
    with pytest.raises(storage.StorageError, match="nothing to download"):
        storage.download_dir(f"{bucket}/ckpt/step-9", tmp_path / "none")
