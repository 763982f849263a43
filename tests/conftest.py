"""Shared pytest fixtures: tiny random-weight models, one local Ray for the whole session, a loopback S3 server.

HAPS_CACHE is deliberately left at the user's default (~/.cache/haps_ray): converting the offline packs
(the Qwen GGUF takes about a minute) must happen once per machine, not once per test session. Tests that
need an empty cache pass `cache_dir=tmp_path` explicitly.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable, Iterator

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from haps_ray.models import TINY_SHAPES, build_tiny_model

TINY_ARCHS = tuple(TINY_SHAPES)
TinyFactory = Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerBase]]


@pytest.fixture(scope="session")
def make_tiny() -> TinyFactory:
    """`make_tiny(arch, seed=0) -> (model, tokenizer)`: a fresh model per call, safe to mutate (attach_lora).

    Each (arch, seed) is built once per session and deep-copied; the tokenizer object is shared between
    calls, so do not change it (copy it first if a test must).
    """
    pristine: dict[tuple[str, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}

    def make(arch: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if (arch, seed) not in pristine:
            pristine[(arch, seed)] = build_tiny_model(arch, seed)
        model, tokenizer = pristine[(arch, seed)]
        return copy.deepcopy(model), tokenizer

    return make


@pytest.fixture(scope="session")
def tiny_models(make_tiny: TinyFactory) -> dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]]:
    """arch -> (model, tokenizer) shared by the whole session: READ-ONLY (use `make_tiny` to mutate)."""
    return {arch: make_tiny(arch) for arch in TINY_ARCHS}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port); yields its endpoint URL, with AWS_* env pointing at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            env.delenv("AWS_PROFILE", raising=False)
            env.delenv("AWS_SESSION_TOKEN", raising=False)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray (2 CPUs) shared by every test that places actors; yields its GCS address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
