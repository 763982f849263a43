"""Hypernetwork heads and the joint policy: shapes in a mixed pool, init, gradients, w/o sharing, checkpoints."""

import pytest
import torch

from haps_ray.config import CandidateConfig, ExperimentConfig, RouterConfig, TaskConfig
from haps_ray.lora import adapter_shapes, attach_lora, use_adapters
from haps_ray.models import build_tiny_model
from haps_ray.routing import HAPSPolicy, HighLevelRouter, RoutingSpec, shapes_from_hf_config
from haps_ray.routing.policy import candidate_shapes

SPEC = RoutingSpec("mmlu", ("teacher", "student"), ("llama", "qwen", "gpt"))
OPEN = (True, True, False)  # gpt is a closed API: routable, no head, no adapter
QUESTIONS = ["What is 2 + 2?", "Which planet is known as the red planet? Answer with one word."]
K = 2


@pytest.fixture(scope="module")
def candidates():
    """The candidate engines' models with per-sample LoRA on the last K layers: name -> (model, tokenizer)."""
    pool = {"llama": build_tiny_model("llama", seed=1), "qwen": build_tiny_model("qwen2", seed=2)}
    for model, _ in pool.values():
        attach_lora(model, K)
    return pool


def make_policy(candidates, **router_fields) -> HAPSPolicy:
    model, tokenizer = build_tiny_model("llama")
    router = HighLevelRouter(model, tokenizer, SPEC, max_prompt_tokens=512)
    cfg = RouterConfig(lora_rank=4, hidden=32, lora_layers=K, **router_fields)
    shapes = {name: adapter_shapes(m) for name, (m, _) in candidates.items()}
    return HAPSPolicy(router, shapes, OPEN, cfg, seed=0)


def candidate_logits(candidates, name, adapters):
    model, tokenizer = candidates[name]
    ids = tokenizer(["The answer is", "Mars is red"], return_tensors="pt", padding=True)
    with torch.no_grad(), use_adapters(model, adapters):
        return model(**ids).logits


def test_tiny_pool_sizes(candidates):
    llama, qwen = candidates["llama"][0], candidates["qwen"][0]
    assert adapter_shapes(llama) == [(64, 64)] * K and adapter_shapes(qwen) == [(48, 48)] * K
    assert shapes_from_hf_config(llama.config, K) == adapter_shapes(llama)
    assert shapes_from_hf_config(qwen.config, K) == adapter_shapes(qwen)


def test_from_config_builds_a_head_per_open_candidate_at_its_own_size(candidates):
    cfg = ExperimentConfig(
        candidates=[
            CandidateConfig(name="llama", model="tiny-llama"),
            CandidateConfig(name="qwen", model="tiny-qwen2"),
            CandidateConfig(name="gpt", model="openai/gpt-4o", open_source=False),
        ]
    )
    cfg.router.backbone = "tiny-llama"
    cfg.router.lora_layers, cfg.router.lora_rank, cfg.router.hidden = K, 4, 32
    policy = HAPSPolicy.from_config(cfg)  # shapes read from each open candidate's config
    assert policy.hypernet.names == ["llama", "qwen"]
    assert policy.hypernet.shapes() == {"llama": [(64, 64)] * K, "qwen": [(48, 48)] * K}
    actions = policy.evaluate(QUESTIONS, [(0, 1), {"teacher": 2, "student": 0}])
    assert sorted(actions[0].adapters) == ["llama", "qwen"] and sorted(actions[1].adapters) == ["llama"]
    assert actions[1].z == {"teacher": 2, "student": 0} and actions[1].assignment == (2, 0)
    for action in actions:
        for name, adapter in action.adapters.items():
            d = 64 if name == "llama" else 48
            assert adapter.A.shape == (K, 4, d) and adapter.B.shape == (K, d, 4) and adapter.alpha == cfg.router.lora_alpha
    # Each adapter fits its own candidate's o_proj: the engine's per-sample LoRA takes it.
    for name in ("llama", "qwen"):
        adapter = actions[0].adapters[name]
        candidate_logits(candidates, name, [adapter, None])


def test_closed_candidate_gets_no_head_and_no_adapter(candidates):
    policy = make_policy(candidates)
    assert len(policy.hypernet.heads) == 2 and "gpt" not in policy.hypernet.names
    only_closed = policy.evaluate(QUESTIONS[:1], [(2, 2)])[0]
    assert only_closed.adapters == {}
    shapes = {name: adapter_shapes(m) for name, (m, _) in candidates.items()} | {"gpt": [(64, 64)] * K}
    with pytest.raises(ValueError, match=r"adapter shapes given for \['gpt'\], which are not open-source"):
        HAPSPolicy(policy.router, shapes, OPEN, policy.cfg)
    with pytest.raises(ValueError, match=r"no adapter shapes for open-source candidates \['qwen'\]"):
        HAPSPolicy(policy.router, {"llama": shapes["llama"]}, OPEN, policy.cfg)


def test_zero_init_gives_exactly_the_base_model(candidates):
    policy = make_policy(candidates, init="zero")
    adapters = policy.evaluate(QUESTIONS, [(0, 1), (1, 0)])
    for name in ("llama", "qwen"):
        pair = [a.adapters[name] for a in adapters]
        assert all(float(a.A.detach().abs().sum()) > 0 and torch.equal(a.B, torch.zeros_like(a.B)) for a in pair)
        assert torch.equal(candidate_logits(candidates, name, pair), candidate_logits(candidates, name, None))


def test_authors_init_and_per_layer_options(candidates):
    per_layer = make_policy(candidates, init="authors").evaluate(QUESTIONS, [(0, 1), (0, 1)])
    llama = [a.adapters["llama"] for a in per_layer]
    assert float(llama[0].B.detach().abs().sum()) > 0 and not torch.equal(llama[0].A[0], llama[0].A[1])
    assert not torch.equal(llama[0].A, llama[1].A)  # every input gets its own adapter
    base = candidate_logits(candidates, "llama", None)
    assert not torch.allclose(candidate_logits(candidates, "llama", llama), base)

    shared_policy = make_policy(candidates, init="authors", per_layer_adapters=False)
    head = shared_policy.hypernet.head("qwen")
    assert head.out_A.out_features == 4 * 48 and head.out_B.out_features == 48 * 4  # one layer's worth
    shared = shared_policy.evaluate(QUESTIONS[:1], [(1, 1)])[0].adapters["qwen"]
    assert shared.A.shape == (K, 4, 48) and torch.equal(shared.A[0], shared.A[1]) and torch.equal(shared.B[0], shared.B[1])


def joint_loss(actions, router_term: bool = True):
    """-Σ log π(z|x) plus a fixed random linear function of every generated factor (stands in for the engines)."""
    gen = torch.Generator().manual_seed(0)
    loss = -torch.stack([a.log_prob for a in actions]).sum() if router_term else torch.zeros(())
    for action in actions:
        for adapter in action.adapters.values():
            loss = loss + (adapter.A * torch.randn(adapter.A.shape, generator=gen)).sum()
            loss = loss + (adapter.B * torch.randn(adapter.B.shape, generator=gen)).sum()
    return loss


def test_gradients_reach_backbone_and_heads(candidates):
    policy = make_policy(candidates)
    actions = policy.act(QUESTIONS, mode="sample", seed=1)
    again = policy.evaluate(QUESTIONS, [a.assignment for a in actions])
    assert [a.log_prob.detach().item() for a in again] == pytest.approx([a.log_prob.detach().item() for a in actions], abs=1e-6)
    used = {name for a in actions for name in a.adapters}
    joint_loss(actions).backward()
    backbone = policy.router.model
    for param in (backbone.get_input_embeddings().weight, backbone.model.layers[0].self_attn.q_proj.weight,
                  backbone.model.layers[-1].mlp.down_proj.weight):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0
    for name in policy.hypernet.names:
        head = policy.hypernet.head(name)
        grads = [head.mlp[0].weight.grad, head.out_A.weight.grad, head.out_B.weight.grad]
        if name in used:
            assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_backbone_grad_false_keeps_the_generator_loss_out_of_the_backbone(candidates):
    policy = make_policy(candidates, backbone_grad=False)
    actions = policy.evaluate(QUESTIONS, [(0, 1), (1, 0)])
    joint_loss(actions, router_term=False).backward()
    assert all(p.grad is None for p in policy.router.model.parameters())
    assert float(policy.hypernet.head("llama").out_A.weight.grad.abs().sum()) > 0


def test_without_sharing_heads_can_read_a_separate_frozen_copy(candidates):
    policy = make_policy(candidates, share_backbone=False, separate_backbone="frozen")
    router_params = dict(policy.router.model.named_parameters())
    frozen_params = dict(policy.feature_model.named_parameters())
    assert router_params.keys() == frozen_params.keys()
    assert not {id(p) for p in router_params.values()} & {id(p) for p in frozen_params.values()}
    assert all(not p.requires_grad for p in frozen_params.values())
    assert all(p.requires_grad for p in router_params.values())
    frozen_before = {k: v.detach().clone() for k, v in frozen_params.items()}
    router_before = {k: v.detach().clone() for k, v in router_params.items()}
    batch = policy.router.encode(QUESTIONS)
    features_before = policy.features(batch, policy.router.pooled(batch)).detach()

    groups = policy.parameter_groups()
    assert groups["feature_backbone"] == []
    opt = torch.optim.Adam([{"params": groups["router"], "lr": 1e-3}, {"params": groups["heads"], "lr": 1e-3}])
    for step in range(2):
        opt.zero_grad()
        joint_loss(policy.act(QUESTIONS, mode="sample", seed=step)).backward()
        assert all(p.grad is None for p in frozen_params.values())
        opt.step()
    assert any(not torch.equal(router_before[k], p) for k, p in router_params.items())  # the router did train
    assert all(torch.equal(frozen_before[k], p) for k, p in frozen_params.items())
    features_after = policy.features(batch, policy.router.pooled(batch))
    assert torch.equal(features_before, features_after)


@pytest.mark.parametrize("share", [True, False])
def test_checkpoint_round_trip_is_bit_exact(candidates, tmp_path, share):
    policy = make_policy(candidates, share_backbone=share, init="authors")
    groups = policy.parameter_groups()
    opt = torch.optim.SGD(groups["router"] + groups["heads"], lr=1e-2)
    joint_loss(policy.act(QUESTIONS, seed=0)).backward()
    opt.step()  # weights now differ from anything a fresh build would give
    policy.save(tmp_path / "ckpt")
    loaded = HAPSPolicy.load(tmp_path / "ckpt", device="cpu")
    assert candidate_shapes(str(tmp_path / "ckpt" / "backbone"), K) == [(64, 64)] * K  # read from config.json alone
    original, restored = policy.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.spec == policy.spec and loaded.open_source == policy.open_source and loaded.cfg == policy.cfg
    first = policy.act(QUESTIONS, mode="greedy")
    second = loaded.act(QUESTIONS, mode="greedy")
    for a, b in zip(first, second):
        assert a.assignment == b.assignment and torch.equal(a.log_prob, b.log_prob)
        assert a.adapters.keys() == b.adapters.keys()
        assert all(torch.equal(a.adapters[n].A, b.adapters[n].A) and torch.equal(a.adapters[n].B, b.adapters[n].B) for n in a.adapters)


@pytest.mark.parametrize("per_layer", [True, False])
def test_per_layer_adapters_decides_what_each_layer_learns(candidates, per_layer):
    """k distinct adapters (ours) vs one ΔW reused by all k layers (the authors'): a layer's gradient reaches its own
    slice of the head's output, or all k layers' gradients add up in the one shared adapter."""
    policy = make_policy(candidates, init="authors", per_layer_adapters=per_layer)
    head = policy.hypernet.head("llama")
    assert head.out_A.out_features == (K if per_layer else 1) * 4 * 64
    adapter = policy.evaluate(QUESTIONS[:1], [(0, 0)])[0].adapters["llama"]
    assert torch.equal(adapter.A[0], adapter.A[1]) is (not per_layer)
    gen = torch.Generator().manual_seed(0)
    per_layer_grads = torch.randn(adapter.A.shape, generator=gen)  # (K, r, d_in): what an engine returns per layer
    torch.autograd.backward([adapter.A], grad_tensors=[per_layer_grads])
    bias_grad = head.out_A.bias.grad.view(-1, 4, 64)  # ∂L/∂(emitted A): the bias sees it unchanged
    expected = per_layer_grads if per_layer else per_layer_grads.sum(0, keepdim=True)
    assert torch.allclose(bias_grad, expected, atol=1e-6)
