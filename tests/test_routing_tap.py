"""The routing tap: the one reader of router outputs reproduces the readers it replaced, and agrees with training.

The readers it replaced (sampling's ActiveExpertMeter, the analysis' RoutingRecorder, the study's probe) are kept
below, reduced to their counting, as the reference: attached to the SAME run as the tap, they must see the same.
"""
import pytest
import torch

from dit_moe.config import RoutingConfig
from dit_moe.models import moe
from dit_moe.models.routers.base import Router
from dit_moe.models.routing_tap import METRICS, RoutingTap, stats_from_sums, sum_slices, token_stats
from dit_moe.registry import build_model
from dit_moe.sampling import SampleConfig, make_generators, sample_latents
from dit_moe.study.probe import probe_routing

LABELS = torch.tensor([0, 3, 7, 7])


class _Hooks:
    def __init__(self, model):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]

    def __enter__(self):
        self.handles = [r.register_forward_hook(self.hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class ActiveExpertMeter(_Hooks):
    """sampling.ActiveExpertMeter as it was: num_active summed per (bucket set by the sampler's callback, layer)."""

    def __init__(self, model, num_buckets=10):
        super().__init__(model)
        self.sums = torch.zeros(num_buckets, len(self.routers), dtype=torch.float64)
        self.tokens = torch.zeros_like(self.sums)
        self.num_buckets, self.bucket = num_buckets, 0

    def set_timestep(self, t):
        self.bucket = min(self.num_buckets - 1, max(0, int(t) * self.num_buckets // 1000))

    def hook(self, layer):
        def fn(module, inputs, out):
            self.sums[self.bucket, layer] += out.num_active.to(torch.float64).sum()
            self.tokens[self.bucket, layer] += out.num_active.numel()
        return fn


class RoutingRecorder(_Hooks):
    """analyze.RoutingRecorder as it was: per call (step, num_active, mask counts over the first split tokens and
    the rest)."""

    def __init__(self, model):
        super().__init__(model)
        self.step, self.split = 0, None
        self.calls = [[] for _ in self.routers]

    def hook(self, layer):
        def fn(module, inputs, out):
            n = out.mask.shape[0] if self.split is None else self.split
            counts = torch.stack([out.mask[:n].sum(0), out.mask[n:].sum(0)]).to(torch.int64)
            self.calls[layer].append((self.step, out.num_active.to(torch.int16), counts))
        return fn


def tiny(routing="dtopp", seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model("DiT-T/2-E4K2", RoutingConfig(type=routing, **kw), input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():  # leave adaLN-Zero's identity start, so routing depends on t and y
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _sample(model, callback=None, steps=4, cfg=2.0, sampler="ddim"):
    return sample_latents(model, LABELS, make_generators(0, range(len(LABELS))), SampleConfig(sampler, steps, cfg),
                          (1, 8, 8), callback=callback)


@pytest.mark.parametrize("routing", ["dtopp", "topk", "expert_choice"])
def test_tap_counts_equal_the_sampling_meter_on_the_same_run(routing):
    model = tiny(routing)
    meter, tap = ActiveExpertMeter(model), RoutingTap(model)
    with meter, tap:
        _sample(model, callback=lambda i, t, x: meter.set_timestep(t), sampler="ddpm", steps=5)
    ix = sum_slices(4)
    assert torch.equal(tap.sums[..., ix["active"]], meter.sums)          # exact: sums of integers in float64
    assert torch.equal(tap.sums[..., ix["tokens"]], meter.tokens)
    assert (meter.tokens.sum(1) > 0).sum() >= 3                           # several buckets seen


@pytest.mark.parametrize("routing", ["dtopp", "expert_choice"])
def test_tap_records_equal_the_analysis_recorder_on_the_same_run(routing):
    model = tiny(routing)
    rec, tap = RoutingRecorder(model), RoutingTap(model, records=True)
    B, T = len(LABELS), 16
    rec.split = B * T                                                     # conditional half first under CFG
    with rec, tap:
        _sample(model, callback=lambda i, t, x: setattr(rec, "step", i))
    for layer in range(tap.num_layers):
        old, new = rec.calls[layer], tap.records[layer]
        assert len(old) == len(new) == 4
        for (step, active, counts), r in zip(old, new):
            assert r["call"] == step
            assert torch.equal(r["active"].flatten(), active)
            assert torch.equal(r["counts"], counts)
            assert (r["y"][B:] == 10).all() and (r["y"][:B] == LABELS).all()   # null copies known by label


def _old_probe(model, inputs):
    """The study probe as it was (RoutingRecorder over fixed inputs), for the comparison."""
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder:
        for x, t, y in inputs:
            model(x, t, y)
    per_layer = [torch.cat([c[1] for c in calls]).to(torch.float64) for calls in recorder.calls]
    allv = torch.cat(per_layer)
    return {"mean": float(allv.mean()), "std": float(allv.std(unbiased=False)),
            "per_layer": [float(v.mean()) for v in per_layer], "tokens": int(allv.numel())}


def test_tap_probe_equals_the_old_probe():
    model = tiny("dtopp")
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
               torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    old, new = _old_probe(model, inputs), probe_routing(model, inputs)
    assert new["mean"] == pytest.approx(old["mean"], rel=1e-12)
    assert new["std"] == pytest.approx(old["std"], rel=1e-9)
    assert new["per_layer"] == pytest.approx(old["per_layer"], rel=1e-12) and new["tokens"] == old["tokens"]
    assert old["std"] > 0


def test_training_statistics_are_the_tap_sums_of_the_same_forward():
    """routing_step's per-layer statistics == the tap's over the same training forward (one definition)."""
    for routing in ("topp", "dtopp", "expert_choice"):
        model = tiny(routing, seed=1).train()
        x, t, y = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
        with RoutingTap(model, buckets=4) as tap:
            model(x, t, y)
        stats = moe.routing_step(model)
        mine = stats_from_sums(tap.sums.sum(0).float(), 4)
        for key in ("mean_active", "active_std", "entropy", "logit_std", "load", "active_hist", "unrouted_frac"):
            torch.testing.assert_close(mine[key], stats[key], rtol=1e-5, atol=1e-6)
        assert set(stats) <= set(METRICS), set(stats) - set(METRICS)


def test_buckets_classes_and_patches():
    model = tiny("dtopp")
    with RoutingTap(model, buckets=10, by_class=True, by_patch=True) as tap:
        _sample(model)                                                     # DDIM 4 steps: t = 999, 749, 499, 249
    report = tap.report()
    assert [b for b, v in enumerate(report["per_bucket"]) if v is not None] == [2, 4, 7, 9]
    per_class = report["per_class"]
    assert [c for c, n in enumerate(per_class["tokens"]) if n > 0] == [0, 3, 7, 10]    # 10: the CFG null copies
    assert per_class["tokens"][7] == 2 * per_class["tokens"][0]
    assert len(report["per_patch"]["mean"]) == 16
    # Every view sums to the same totals.
    ix = sum_slices(4)
    total = tap.sums.sum((0, 1))
    for sums in (tap.class_sums, tap.patch_sums):
        torch.testing.assert_close(sums.sum((0, 1)), total)
    assert report["tokens"] == float(total[ix["tokens"]]) == 4 * 4 * 16 * 2 * len(LABELS)


def test_token_stats_columns():
    from dit_moe.models.routers import TopPRouter

    r = TopPRouter(8, 4, threshold=0.6, k_max=2)(torch.randn(10, 8))
    rows = token_stats(r)
    ix = sum_slices(4)
    assert torch.equal(rows[:, ix["active"]], r.num_active.float())
    assert torch.equal(rows[:, ix["counts"]].sum(0), r.counts.float())
    assert torch.equal(rows[:, ix["hist"]].argmax(1), r.num_active)
    assert torch.equal(rows[:, ix["capped"]], r.capped.float())


def test_every_metric_is_documented_once():
    """docs/routing-metrics.md lists every METRICS name with its definition and every metrics.jsonl key."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "routing-metrics.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines()
            if line.startswith("| `") and line.count("|") == 5}
    assert set(rows) == set(METRICS)
    for name, metric in METRICS.items():
        assert metric.doc in rows[name], name
        for key, how in metric.log:
            assert f"`{key}` ({how})" in rows[name], (name, key)


def test_call_sums_and_records_are_the_same_forwards():
    """by_call: one row of sums per model call, equal to that call's per-token records and summing to the buckets."""
    model = tiny("dtopp")
    with RoutingTap(model, records=True, by_call=True) as tap:
        _sample(model)                                                     # DDIM 4 steps under CFG: 4 model calls
    ix = sum_slices(4)
    assert tap.call_sums.shape[0] == 4
    for layer, calls in enumerate(tap.records):
        for r in calls:
            assert float(tap.call_sums[r["call"], layer, ix["active"]]) == float(r["active"].double().sum())
            assert float(tap.call_sums[r["call"], layer, ix["tokens"]]) == r["active"].numel()
            assert torch.equal(tap.call_sums[r["call"], layer, ix["counts"]].long(), r["counts"].sum(0))
    torch.testing.assert_close(tap.call_sums.sum(0), tap.sums.sum(0), rtol=0, atol=0)
