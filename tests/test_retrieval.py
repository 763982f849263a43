"""Dense retriever: finds the right paragraph with the offline MiniLM, caches per problem, pools correctly;
RetrieverActor gives the same answers over Ray."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from haps_ray.config import RetrieverConfig
from haps_ray.retrieval import Retriever, resolve_encoder
from haps_ray.tasks import load_problems

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def problems():
    loaded, _ = load_problems("hotpotqa", str(FIXTURES / "hotpotqa_small.json"))
    return {p.id: p for p in loaded}


@pytest.fixture(scope="module")
def minilm() -> Retriever:
    return Retriever.from_config(RetrieverConfig(device="cpu"))


def test_finds_the_right_paragraph_in_each_problems_own_context(minilm, problems):
    tower, births, opera = problems["hp-0001"], problems["hp-0002"], problems["hp-0003"]
    hits = minilm.retrieve([tower, tower, births, opera],
                           ["Dravik", "Arlen Clock Tower", "Ines Abbot", "violin string instrument"])
    assert [h[0].title for h in hits] == ["Dravik", "Arlen Clock Tower", "Ines Abbot", "Violin"]
    dravik = hits[0][0]
    assert dravik.text == tower.paragraphs[1][1] and dravik.index == 1 and 0 < dravik.score <= 1
    # a query only ever sees its own problem's paragraphs
    assert all(h[0].title in {t for t, _ in p.paragraphs} for h, p in zip(hits, [tower, tower, births, opera]))


def test_corpus_is_encoded_once_per_problem_and_queries_are_batched(problems):
    retriever = Retriever(device="cpu", batch_size=64)
    batch = [problems["hp-0001"], problems["hp-0002"], problems["hp-0001"]]
    retriever.retrieve(batch, ["a", "b", "c"])
    # one pass for the 7 paragraphs of both problems, one for the three queries
    assert retriever.forward_passes == 2 and retriever.paragraphs_encoded == 4 + 3
    retriever.retrieve(batch, ["d", "e", "f"])
    assert retriever.forward_passes == 3 and retriever.paragraphs_encoded == 7  # corpus came from the cache


def test_top_k_scores_are_cosines_best_first(minilm, problems):
    tower = problems["hp-0001"]
    (hits,) = minilm.retrieve([tower], ["a port city with a river"], top_k=4)
    assert len(hits) == 4 and sorted(h.index for h in hits) == [0, 1, 2, 3]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    corpus = minilm.encode([f"{t}. {b}" for t, b in tower.paragraphs])
    query = minilm.encode(["a port city with a river"])[0]
    expected = torch.nn.functional.cosine_similarity(corpus, query.unsqueeze(0))
    assert torch.allclose(torch.tensor([expected[h.index] for h in hits]), torch.tensor(scores), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> str:
    """A random-weight 2-layer BERT saved with MiniLM's tokenizer: exercises loading any HF encoder directory."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_encoder("all-minilm-l6-v2")).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_matches_a_direct_forward_and_ignores_padding(tiny_encoder_dir, pooling):
    retriever = Retriever(tiny_encoder_dir, pooling=pooling, device="cpu")
    short, long = "river", "a much longer sentence about a port city and its river mouth"
    batched = retriever.encode([short, long])
    alone = retriever.encode([short])
    assert torch.allclose(batched[0], alone[0], atol=1e-5)  # padding in the batch changes nothing
    tokens = retriever.tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        hidden = retriever.model(**tokens).last_hidden_state[0]  # (t, d)
    reference = hidden[0] if pooling == "cls" else hidden.mean(0)
    assert torch.allclose(alone[0], torch.nn.functional.normalize(reference, dim=-1), atol=1e-5)


def test_bad_arguments(tiny_encoder_dir, problems):
    with pytest.raises(ValueError, match="pooling"):
        Retriever(tiny_encoder_dir, pooling="max", device="cpu")
    retriever = Retriever(tiny_encoder_dir, device="cpu")
    with pytest.raises(ValueError, match="2 problems but 1 queries"):
        retriever.retrieve([problems["hp-0001"]] * 2, ["x"])


@pytest.mark.slow
def test_retriever_actor_matches_local(ray_session, minilm, problems):
    import ray

    from actors.retriever import RetrieverActor, RetrieverActorClient

    actor = RetrieverActor.remote(RetrieverConfig(device="cpu"))
    try:
        batch = [problems["hp-0001"], problems["hp-0003"]]
        queries = ["Dravik river", "who founded the opera"]
        remote = RetrieverActorClient(actor).retrieve(batch, queries).result()
        local = minilm.retrieve(batch, queries)
        assert [[(p.title, p.index) for p in hits] for hits in remote] == [[(p.title, p.index) for p in hits] for hits in local]
        assert remote[0][0].score == pytest.approx(local[0][0].score, abs=1e-5)
        health = ray.get(actor.health.remote())
        assert health["ok"] and health["calls"] == 1 and health["cached_problems"] == 2
    finally:
        ray.kill(actor)


def test_title_in_embedding_false_encodes_the_sentences_alone(problems):
    tower = problems["hp-0001"]
    bare = Retriever(device="cpu", title_in_embedding=False)
    (hits,) = bare.retrieve([tower], ["a port city with a river"], top_k=4)
    corpus = bare.encode([b for _, b in tower.paragraphs])  # the authors' layout: no title
    query = bare.encode(["a port city with a river"])[0]
    expected = torch.nn.functional.cosine_similarity(corpus, query.unsqueeze(0))
    assert torch.allclose(torch.tensor([expected[h.index] for h in hits]), torch.tensor([h.score for h in hits]), atol=1e-5)
    titled = Retriever(device="cpu").retrieve([tower], ["a port city with a river"], top_k=4)[0]
    assert [h.score for h in titled] != [h.score for h in hits]  # the switch changes what is embedded
    assert Retriever.from_config(RetrieverConfig(device="cpu", title_in_embedding=False)).title_in_embedding is False
