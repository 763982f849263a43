"""Query embeddings every baseline router reads, computed once per text and cached (memory and disk).

Two kinds of encoder (`baselines.encoder`):
- a sentence encoder: 'all-minilm-l6-v2' (the offline pack, located as the retriever locates it), an HF encoder
  id or a local directory; mean-pooled last hidden states, L2-normalised (how MiniLM was trained);
- 'router': the HAPS router backbone (`router.backbone`), its final hidden states mean-pooled over the query, the
  same features HAPS's own heads read (there over the whole routing prompt).

    encoder = QueryEncoder.from_config(cfg, cache_dir=f"{run_dir}/baselines/embeddings")
    x = encoder.encode(problems)          # (N, d) float32, in the order given

The cache key is the sha256 of the text, so the same question under another id (or a rebuilt split) is reused and
an edited question is not; the disk cache is one safetensors file per encoder.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import AutoModel, AutoTokenizer

from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.models import load_model
from haps_ray.pooling import mean_pool
from haps_ray.retrieval import resolve_encoder
from haps_ray.tasks.problem import LETTERS, Problem

logger = logging.getLogger(__name__)

ROUTER_ENCODER = "router"


def query_text(problem: Problem) -> str:
    """What a baseline sees of a problem: the question, and MMLU's lettered choices."""
    if problem.choices:
        return problem.question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(problem.choices))
    return problem.question


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class QueryEncoder:
    """Text -> embedding (d,) with a sha256-keyed cache; `encode_texts` runs only the texts it has not seen."""

    def __init__(self, name: str, router_backbone: str = "", cache_dir: str = "", batch_size: int = 32,
                 max_length: int = 256) -> None:
        self.name = name
        if name == ROUTER_ENCODER:
            if not router_backbone:
                raise ValueError("baselines.encoder='router' needs router.backbone")
            self.model, self.tokenizer = load_model(router_backbone, dtype="float32", device="cpu")
            self.label = f"router:{router_backbone}"
            self.normalize = False  # an LM's pooled states are what HAPS's heads read, unnormalised
        else:
            location = resolve_encoder(name)
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location).eval().requires_grad_(False)
            self.label = name
            self.normalize = True
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size, self.max_length = batch_size, max_length
        self.cache_uri = storage.join(cache_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", self.label) + ".safetensors") if cache_dir else ""
        self._cache: dict[str, torch.Tensor] = {}
        if self.cache_uri and storage.exists(self.cache_uri):
            self._cache = dict(load_tensors(storage.read_bytes(self.cache_uri)))
        self.texts_encoded = 0  # texts that went through the model (not the cache), for tests and logs

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, cache_dir: str = "") -> QueryEncoder:
        return cls(cfg.baselines.encoder, cfg.router.backbone, cache_dir)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.name == ROUTER_ENCODER:
            hidden = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            hidden = self.model(**batch).last_hidden_state  # (b, t, d)
        pooled = mean_pool(hidden, batch["attention_mask"])  # (b, d)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) float32 embeddings of `texts`, in order; new ones are computed in batches and written to the cache."""
        keys = [_key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            by_key = dict(zip(keys, texts))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                for k, row in zip(chunk, self._forward([by_key[k] for k in chunk])):
                    self._cache[k] = row.contiguous()
            self.texts_encoded += len(todo)
            if self.cache_uri:
                storage.write_bytes(self.cache_uri, save_tensors(self._cache))
            logger.info("encoder %s: %d new texts embedded (%d cached)", self.label, len(todo), len(self._cache))
        if not keys:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[k] for k in keys])

    def encode(self, problems: Sequence[Problem]) -> torch.Tensor:
        """(N, d) embeddings of the problems' query texts (`query_text`)."""
        return self.encode_texts([query_text(p) for p in problems])
