"""Expert-choice routing: the right C tokens per expert, gradients of a dense masked reference, per-sample pooling
independent of the batch, and the model-level wiring (config, Default MoE, sampling)."""
import copy

import pytest
import torch

from dit_moe.config import ConfigError, ExperimentConfig, ModelConfig, RoutingConfig
from dit_moe.models.default_moe import DefaultVectors
from dit_moe.models.moe import ExpertBank, MoEMLP, build_moe_mlp, moe_layers, routing_step
from dit_moe.models.routers import ExpertChoiceRouter, expert_capacity
from dit_moe.models.routing_tap import RoutingTap
from dit_moe.registry import build_model
from dit_moe.sampling import SampleConfig, make_generators, sample_latents
from dit_moe.validation import validate

D, E, K = 12, 6, 2


def _brute_force(probs: torch.Tensor, samples: int, C: int) -> torch.Tensor:
    """(N, E) -> (N, E) bool: for each pool and expert, the C tokens of largest probability, by sorting in Python."""
    N = probs.shape[0]
    n = N // samples
    mask = torch.zeros(N, E, dtype=torch.bool)
    for p in range(samples):
        for e in range(E):
            scores = [(float(probs[p * n + t, e].detach()), p * n + t) for t in range(n)]
            for _, tok in sorted(scores, reverse=True)[:C]:
                mask[tok, e] = True
    return mask


@pytest.mark.parametrize("pool,samples,n,f", [("sample", 3, 10, 1.0), ("batch", 3, 10, 1.0), ("sample", 2, 16, 1.5),
                                              ("batch", 1, 7, 0.5)])
def test_each_expert_takes_exactly_its_top_c_tokens(pool, samples, n, f):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D, E, K, capacity_factor=f, pool=pool)
    x = torch.randn(samples * n, D)
    out = router(x, samples)
    P = samples if pool == "sample" else 1
    C = expert_capacity(samples * n // P, E, K, f)
    assert C == max(1, int(f * (samples * n // P) * K / E))
    assert torch.equal(out.counts, torch.full((E,), P * C))
    assert out.token_idx.numel() == E * P * C                                     # static number of pairs
    assert torch.equal(out.mask, _brute_force(out.probs, P, C))                   # the right tokens
    # Pairs expert-major, tokens ascending in each expert (the order from_mask gives), raw probabilities as weights.
    assert torch.equal(out.expert_idx, torch.arange(E).repeat_interleave(P * C))
    for e in range(E):
        seg = out.token_idx[out.expert_idx == e]
        assert torch.equal(seg, seg.sort().values)
    assert torch.equal(out.weight, out.probs[out.token_idx, out.expert_idx])
    assert torch.equal(out.num_active, out.mask.sum(1))


def test_capacity_formula_and_bounds():
    assert expert_capacity(256, 8, 2, 1.0) == 64                 # = T K / E: the compute of Top-2
    assert expert_capacity(16, 8, 2, 1.25) == 5                  # floor(5.0)
    assert expert_capacity(10, 8, 1, 0.1) == 1                   # at least one token
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(D, E, K, capacity_factor=E / K + 0.5)
    with pytest.raises(ValueError, match="ec_pool"):
        ExpertChoiceRouter(D, E, K, pool="image")


def _expert_outputs(bank, x):
    h = torch.einsum("nd,edh->enh", x, bank.w_in) + bank.b_in[:, None]
    return torch.einsum("enh,ehd->end", bank.activation(h), bank.w_out) + bank.b_out[:, None]


@pytest.mark.parametrize("renormalize,default", [(False, False), (True, False), (False, True)])
def test_gradients_match_a_dense_masked_reference_in_fp64(renormalize, default):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D, E, K, pool="sample", renormalize=renormalize)
    dv = DefaultVectors(E, D, mode="forward") if default else None
    moe = MoEMLP(D, router, ExpertBank(E, D, 10), None, dv).double()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.3)
        if dv is not None:
            dv.vectors.normal_()
    x = torch.randn(3, 8, D, dtype=torch.float64)
    g = torch.randn(3, 8, D, dtype=torch.float64)

    def grads(fn):
        moe.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        (y * g).sum().backward()
        return y.detach(), xx.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}

    def reference(xx):
        flat = xx.reshape(-1, D)
        probs = router.probs(router.logits(flat))
        mask = _brute_force(probs.detach(), 3, expert_capacity(8, E, K, 1.0))
        w = probs * mask
        if renormalize:
            w = w / w.sum(1, keepdim=True).clamp(min=1e-300)
        y = torch.einsum("ne,end->nd", w, _expert_outputs(moe.experts, flat))
        if dv is not None:
            y = y + dv.term(probs, mask)
        return y.reshape(xx.shape)

    y, gx, gp = grads(moe)
    y_ref, gx_ref, gp_ref = grads(reference)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    assert gp["router.weight"].abs().sum() > 0


def test_unrouted_tokens_get_zero_and_are_counted():
    torch.manual_seed(0)
    mc = ModelConfig(expert_hidden_ratio=2.0)
    moe = build_moe_mlp(D, 0, E, 1, mc, RoutingConfig(type="expert_choice", capacity_factor=0.5), None).train()
    x = torch.randn(2, 12, D)
    y = moe(x)
    r = moe.router(x.reshape(-1, D), 2)
    unrouted = r.num_active == 0
    assert unrouted.any()                                        # C = 1 per expert of 12 tokens: most get none
    assert torch.equal(y.reshape(-1, D)[unrouted], torch.zeros(int(unrouted.sum()), D))
    stats = routing_step(moe)
    assert stats["unrouted_frac"].item() == pytest.approx(float(unrouted.float().mean()))
    assert stats["mean_active"].item() == pytest.approx(E * 1 * 2 / 24)      # E C pools / N


def _sample(model, labels, batch_size):
    settings = SampleConfig("ddim", 3, 2.0)
    out = []
    for b in range(0, len(labels), batch_size):
        idx = list(range(b, min(b + batch_size, len(labels))))
        out.append(sample_latents(model, labels[idx], make_generators(0, idx), settings, (1, 8, 8)))
    return torch.cat(out)


def _ec_model(pool, eval_pool=None):
    torch.manual_seed(0)
    model = build_model("DiT-T/2-E4K2", RoutingConfig(type="expert_choice", ec_pool=pool, ec_eval_pool=eval_pool),
                        input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _routing(model, labels, batch_size):
    """Experts of every token at every model call, per sample: (samples, calls, layers, CFG half, T)."""
    with RoutingTap(model, records=True) as tap:
        per_batch = []
        for b in range(0, len(labels), batch_size):
            tap.reset()
            idx = list(range(b, min(b + batch_size, len(labels))))
            sample_latents(model, labels[idx], make_generators(0, idx), SampleConfig("ddim", 3, 2.0), (1, 8, 8))
            B = len(idx)
            per_batch.append(torch.stack([torch.stack([torch.stack([c["active"][:B], c["active"][B:]], 1)
                                                       for c in calls]) for calls in tap.records]))
    return torch.cat([a.permute(2, 1, 0, 3, 4) for a in per_batch])    # (samples, calls, layers, 2, T)


def test_per_sample_pool_samples_do_not_depend_on_batch_size_or_composition():
    """Under CFG each image and its null copy are two pools: an image's routing is the same alone, in a batch of 5
    and with other batch mates, and so is the image (to the float noise Top-k shows between batch sizes)."""
    labels = torch.tensor([1, 4, 4, 9, 0])
    model = _ec_model("sample")
    assert torch.equal(_routing(model, labels, 1), _routing(model, labels, 5))
    one, full = _sample(model, labels, 1), _sample(model, labels, 5)
    torch.testing.assert_close(one, full, rtol=0, atol=1e-3)
    settings = SampleConfig("ddim", 3, 2.0)                 # sample 0 (its label and seed) with other batch mates
    mates = sample_latents(model, labels[[0, 3, 4]], make_generators(0, [0, 3, 4]), settings, (1, 8, 8))
    torch.testing.assert_close(mates[0], full[0], rtol=0, atol=1e-3)
    # A batch-pooled model routes and samples differently at another batch size (the documented caveat) ...
    batch = _ec_model("batch")
    assert not torch.equal(_routing(batch, labels, 1), _routing(batch, labels, 5))
    assert (_sample(batch, labels, 1) - _sample(batch, labels, 5)).abs().max() > 0.1
    # ... unless its eval-mode forwards pool per sample (routing.ec_eval_pool=sample).
    fixed = _ec_model("batch", eval_pool="sample")
    assert torch.equal(_routing(fixed, labels, 1), _routing(fixed, labels, 5))


def test_config_keys_validate_and_build():
    cfg = ExperimentConfig.from_dict({"model": {"name": "DiT-T/2-E8K2", "input_size": 8, "in_channels": 1},
                                      "routing": {"type": "expert_choice", "ec_pool": "batch", "capacity_factor": 1.5,
                                                  "default_moe": True}})
    validate(cfg)
    model = build_model(cfg)
    r = moe_layers(model)[0].router
    assert isinstance(r, ExpertChoiceRouter) and r.pool == r.eval_pool == "batch" and r.capacity_factor == 1.5
    assert r.lb_coef == 0.0 and moe_layers(model)[0].default_vectors is not None
    for bad, message in (({"capacity_factor": 5.0}, "routing.capacity_factor=5.0 must be in (0, E/K = 4]"),
                         ({"balance_bias": True}, "balance_bias=true does not apply to routing.type=expert_choice")):
        c = copy.deepcopy(cfg)
        for k, v in bad.items():
            setattr(c.routing, k, v)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(c)
    with pytest.raises(ConfigError, match="ec_pool"):
        ExperimentConfig.from_dict({"routing": {"ec_pool": "image"}})
