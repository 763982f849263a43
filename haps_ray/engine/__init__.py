"""Text generation with frozen LLMs and per-sample LoRA adapters.

    engine = LLMEngine.from_config(candidate, lora_layers=1)      # llm.py: the engine and its parts
    client = LocalEngineClient(engine)                            # client.py: what the rest of the code calls
    generations = client.generate(messages, adapters, max_new_tokens=64).result()

Parts: chat.py (templating, BOS/EOS, padding; shared with the router), generator.py (decode loop), prefill.py
(grouped prefill, prefix reuse) with prefix_cache.py, ragged.py (ragged decode attention), sampling.py (token
choice, stop strings), teacher_forcing.py (score, adapter gradients), logprobs.py (the one token log-prob path),
hf_internals.py (every private transformers internal used), buckets.py (grouping a mixed batch by engine).
"""

from haps_ray.engine.buckets import Buckets, bucket_by_engine
from haps_ray.engine.chat import ChatEncoder, Messages
from haps_ray.engine.client import (
    Deferred, EngineClient, FatalEngineError, LocalEngineClient, LocalRetrieverClient, Pending, RetrieverClient,
)
from haps_ray.engine.generator import Generation
from haps_ray.engine.llm import LLMEngine

__all__ = [
    "Buckets", "ChatEncoder", "Deferred", "EngineClient", "FatalEngineError", "Generation", "LLMEngine", "LocalEngineClient",
    "LocalRetrieverClient", "Messages", "Pending", "RetrieverClient", "bucket_by_engine",
]
