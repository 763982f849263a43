"""Load a causal LM + tokenizer from anywhere HAPS candidates come from; tiny random-weight builders for tests.

    model, tokenizer = load_model("smollm2-135m-instruct")   # offline pack (verified, converted once)
    model, tokenizer = load_model("tiny-qwen2")              # tiny random-weight model, real tokenizer
    model, tokenizer = load_model("s3://bucket/models/x")    # downloaded into the cache, then loaded
    model, tokenizer = load_model("/path/model.gguf")        # dequantised once, cached by sha256
    config = model_config("tiny-qwen2")                      # its HF config only (no weights loaded)

Every loaded model is in eval mode with all parameters frozen (requires_grad False) and its attention has
an `o_proj` (the per-sample LoRA target, `haps_ray.lora`); every tokenizer has a pad token and pads on the
left, as batched generation needs. `model_checksum` identifies a model's weights in Parquet rows.
Packs, GGUF conversion and the cache layout live in `haps_ray.packs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from haps_ray import packs
from haps_ray.lora import PerSampleLoRALinear, decoder_layers
from haps_ray.packs import UnknownModelError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Shapes of the tiny test models: 2 layers, hidden <= 64, GQA where the real family uses it.
TINY_SHAPES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
    "qwen2": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
}
TINY_TOKENIZER_PACK = {"llama": "smollm2-135m-instruct", "mistral": "smollm2-135m-instruct", "qwen2": "qwen2.5-coder-0.5b-instruct"}

# Our own Mistral-instruct-style template ([INST] ... [/INST]; a system message is prefixed to the first
# user turn), so the tiny Mistral exercises a non-ChatML prompt format.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}[INST] {{ system.text }}{{ message['content'] }} [/INST]"
    "{% set system.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)


def known_sources() -> list[str]:
    return sorted(packs.PACKS) + [f"tiny-{arch}" for arch in TINY_SHAPES]


def load_model(
    source: str, dtype: str = "auto", device: str = "auto", cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    Args:
        source: a pack name, tiny-llama | tiny-qwen2 | tiny-mistral, an HF hub id (org/name), a local
            directory, a .gguf file, or s3://bucket/prefix.
        dtype: float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU).
        device: cpu | cuda | cuda:N | auto (cuda when available).
        cache_dir: cache root for packs, GGUF conversions and S3 downloads (default `$HAPS_CACHE`, else
            ~/.cache/haps_ray); for hub ids, the HF cache directory (default: HF's own).
    Returns:
        (model in eval mode with requires_grad False, tokenizer with a pad token and left padding).
    """
    target_device = _resolve_device(device)
    target_dtype = _resolve_dtype(dtype, target_device)
    cache = packs.cache_root(cache_dir)
    if source in packs.PACKS:
        directory = packs.pack_dir(packs.PACKS[source], cache)
        model, tokenizer = _from_directory(directory, target_dtype)
    elif source.startswith("tiny-") and source[len("tiny-") :] in TINY_SHAPES:
        model, tokenizer = build_tiny_model(source[len("tiny-") :], cache_dir=cache_dir)
    elif source.startswith("s3://"):
        model, tokenizer = _from_local(download_s3_prefix(source, cache), target_dtype, cache)
    elif Path(source).expanduser().exists():
        model, tokenizer = _from_local(Path(source).expanduser(), target_dtype, cache)
    elif source.endswith(".gguf") or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model source {source!r}: no such file or directory")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        hub_cache = str(cache_dir) if cache_dir is not None else None
        model = AutoModelForCausalLM.from_pretrained(source, dtype=target_dtype, cache_dir=hub_cache)
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=hub_cache)
    else:
        raise UnknownModelError(
            f"unknown model source {source!r}: not a known name ({', '.join(known_sources())}), an existing path, "
            "an s3:// URI or an HF hub id of the form org/name"
        )
    return _finish(model.to(device=target_device, dtype=target_dtype), tokenizer)


def require_o_proj(model: nn.Module) -> None:
    """Raise ValueError unless every decoder layer's attention has a linear `o_proj` (the LoRA target)."""
    with contextlib.suppress(ValueError):
        layers = decoder_layers(model)
        attn = [getattr(layer, "self_attn", None) for layer in layers]
        if all(isinstance(getattr(a, "o_proj", None), (nn.Linear, PerSampleLoRALinear)) for a in attn):
            return
    raise ValueError(
        f"{type(model).__name__}: attention has no `o_proj` linear layer at model.model.layers[i].self_attn.o_proj; "
        "HAPS injects its per-sample LoRA there, so only Llama/Qwen2/Mistral/Gemma-style models are supported"
    )


def build_tiny_model(
    arch: str, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer random-weight model of family `arch` (llama | qwen2 | mistral) with a real tokenizer.

    The tokenizer is the SmolLM2 pack's (llama, and mistral with our [INST] chat template) or the Qwen2.5
    pack's (qwen2); vocab_size = len(tokenizer). Same seed -> identical fp32 weights; the global RNG is
    left untouched. Tokenizers are cached under `cache_dir` (default `$HAPS_CACHE`).
    """
    config, tokenizer = _tiny_config(arch, cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _finish(model, tokenizer)


def _tiny_config(arch: str, cache_dir: str | os.PathLike | None) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The HF config of a tiny model of family `arch` and its prepared tokenizer (no weights built)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in TINY_SHAPES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_SHAPES)}")
    cache = packs.cache_root(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(packs.pack_tokenizer_dir(packs.PACKS[TINY_TOKENIZER_PACK[arch]], cache))
    if arch == "mistral":
        tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    _prepare_tokenizer(tokenizer)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_SHAPES[arch],
    )
    return config, tokenizer


def model_config(source: str, cache_dir: str | os.PathLike | None = None) -> PretrainedConfig:
    """The HF config of the model `load_model(source)` would load, without loading its weights.

    Sources as in `load_model`. A pack or a .gguf file is converted once into the cache (as `load_model`
    would) and its config.json read from there; an s3:// prefix is mirrored into the cache first.
    """
    cache = packs.cache_root(cache_dir)
    if source in packs.PACKS:
        return AutoConfig.from_pretrained(packs.pack_dir(packs.PACKS[source], cache))
    if source.startswith("tiny-") and source[len("tiny-") :] in TINY_SHAPES:
        return _tiny_config(source[len("tiny-") :], cache_dir)[0]
    if source.startswith("s3://"):
        return _local_config(download_s3_prefix(source, cache), cache)
    if Path(source).expanduser().exists():
        return _local_config(Path(source).expanduser(), cache)
    if source.endswith(".gguf") or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model source {source!r}: no such file or directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return AutoConfig.from_pretrained(source, cache_dir=str(cache_dir) if cache_dir is not None else None)
    raise UnknownModelError(
        f"unknown model source {source!r}: not a known name ({', '.join(known_sources())}), an existing path, "
        "an s3:// URI or an HF hub id of the form org/name"
    )


def model_checksum(model: nn.Module) -> str:
    """sha256 (hex) identifying the weights: a hash over (name, dtype, shape, sha256 of bytes) of every
    state_dict tensor, sorted by name.

    Names are taken with `.base_layer` removed, so attaching per-sample LoRA wrappers keeps the checksum.
    Tensors are hashed in parallel (hashlib releases the GIL) and tied weights only once, which keeps a
    0.5B fp32 model at a few seconds.
    """
    state = {name.replace(".base_layer", ""): tensor.detach() for name, tensor in model.state_dict().items()}
    keys = {name: (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride()) for name, t in state.items()}
    unique = {key: name for name, key in keys.items()}  # one representative per storage: tied weights hash once
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        by_storage = dict(zip(unique, pool.map(_tensor_sha256, [state[n] for n in unique.values()])))
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{by_storage[keys[name]]}\n".encode())
    return digest.hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    flat = tensor.to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()


def download_s3_prefix(uri: str, cache: Path) -> Path:
    """Mirror every object under s3://bucket/prefix into `<cache>/s3/bucket/prefix`; returns that directory.

    Objects already present with the same ETag and size are not downloaded again. The endpoint comes from
    `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` when set (a MinIO or moto server), else AWS.
    """
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: expected s3://bucket/prefix")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint)
    target = cache / "s3" / bucket / prefix
    manifest_path = target / ".haps_s3_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    objects = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
               for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    fetched = 0
    for obj in objects:
        relative = Path(obj["Key"][len(prefix) :])
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{uri}: refusing object key {obj['Key']!r} that escapes the prefix")
        local = target / relative
        if local.is_file() and local.stat().st_size == obj["Size"] and manifest.get(obj["Key"]) == obj["ETag"]:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        os.close(fd)
        client.download_file(bucket, obj["Key"], tmp)
        os.replace(tmp, local)
        manifest[obj["Key"]] = obj["ETag"]
        fetched += 1
    packs.write_json_atomic(manifest_path, manifest)
    logger.info("%s: %d objects, %d downloaded into %s", uri, len(objects), fetched, target)
    return target


def _local_directory(path: Path, cache: Path) -> Path:
    """The save_pretrained directory behind a local source: itself, or the cached conversion of its .gguf."""
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path}: no config.json and {len(ggufs)} .gguf files; cannot tell what to load")
        path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or give the save_pretrained directory)")
        path = packs.converted_gguf_dir(path, cache)
    return path


def _from_local(path: Path, dtype: torch.dtype, cache: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A .gguf file, a save_pretrained directory, or a directory holding exactly one .gguf file."""
    return _from_directory(_local_directory(path, cache), dtype)


def _local_config(path: Path, cache: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(_local_directory(path, cache))


def _from_directory(directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(directory)


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    require_o_proj(model)
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation appends on the right


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(source: str, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The prepared tokenizer `load_model(source)` would return, without loading weights (sources as there;
    a pack's tokenizer is extracted once into the cache). Counts tokens of closed API candidates."""
    cache = packs.cache_root(cache_dir)
    if source in packs.PACKS:
        tokenizer = AutoTokenizer.from_pretrained(packs.pack_tokenizer_dir(packs.PACKS[source], cache))
    elif source.startswith("tiny-") and source[len("tiny-") :] in TINY_SHAPES:
        return _tiny_config(source[len("tiny-") :], cache_dir)[1]
    elif Path(source).expanduser().is_dir():
        tokenizer = AutoTokenizer.from_pretrained(Path(source).expanduser())
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=str(cache_dir) if cache_dir is not None else None)
    else:
        raise UnknownModelError(f"tokenizer source {source!r}: not a pack, a tiny builder, a local directory or an HF hub id")
    _prepare_tokenizer(tokenizer)
    return tokenizer
