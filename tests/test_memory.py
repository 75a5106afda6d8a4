"""dit_moe.memory: parameter counts against the meta-built model and a closed form, the per-GPU byte arithmetic of
ddp, fsdp and ep, and the per-step traffic against hand formulas."""
import math

import pytest
import torch

from dit_moe.config import RoutingConfig
from dit_moe.memory import BYTES, _shard_numel, memory_table, step_traffic, traffic_table, training_memory
from dit_moe.models.moe import moe_layers
from dit_moe.registry import build_model, count_params
from dit_moe.training.parallel.ep import expert_range


def closed_form(D, depth, E=0, C=4, patch=2, classes=1000, freq=256):
    """DiT's parameter count by hand (learned sigma: 2C outputs), MLPs or gelu MoE-MLPs of width 4D, Top-k router."""
    out = 2 * C
    embed = C * patch * patch * D + D + freq * D + D + D * D + D + (classes + 1) * D
    attn = 3 * D * D + 3 * D + D * D + D
    ada = D * 6 * D + 6 * D
    mlp = 2 * D * 4 * D + 4 * D + D
    moe = E * D + E * mlp
    final = D * 2 * D + 2 * D + D * patch * patch * out + patch * patch * out
    return embed + depth * (attn + ada + (moe if E else mlp)) + final


@pytest.mark.parametrize("name,D,depth,E", [("DiT-XL/2", 1152, 28, 0), ("DiT-XL/2-E8K2", 1152, 28, 8),
                                            ("DiT-XL/2-E16K2", 1152, 28, 16), ("DiT-S/2-E8K2", 384, 12, 8)])
def test_parameter_counts_match_the_meta_model_and_the_closed_form(name, D, depth, E):
    m = training_memory(name)
    with torch.device("meta"):
        model = build_model(name)
    assert m["params"] == sum(p.numel() for p in model.parameters()) == closed_form(D, depth, E)
    assert m["params"] + model.pos_embed.numel() == count_params(name)["total_params"]


def test_bytes_per_strategy():
    m = training_memory("DiT-XL/2-E8K2", world=8)
    n, d, f = m["params"], m["ddp"], m["fsdp"]
    assert d == {"params": 4 * n, "grads": 4 * n, "adamw": 8 * n, "ema": 4 * n, "persistent": 20 * n}
    # Every rank stores ceil(dim0 / 8) rows of every parameter: at least n / 8, at most one padded row more each.
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in build_model("DiT-XL/2-E8K2").parameters()]
    pad = sum(math.prod(s[1:]) for s in shapes)
    assert 20 * n / 8 <= f["persistent"] <= 20 * (n / 8 + pad)
    assert f["peak"] == f["persistent"] + f["transient"] and 0 < f["transient"] < d["persistent"] / 8
    one = training_memory("DiT-XL/2-E8K2", world=1)["fsdp"]
    assert {k: one[k] for k in BYTES} == {k: d[k] for k in BYTES}      # one rank: fsdp stores what ddp stores


def test_scalar_parameters_count_as_one_padded_row():
    assert _shard_numel((), 8) == 1 and _shard_numel((8, 3), 8) == 3 and _shard_numel((9, 3), 8) == 6
    dtopp = training_memory("DiT-T/2-E8K2", routing=RoutingConfig(type="dtopp"), input_size=8, in_channels=1)
    topk = training_memory("DiT-T/2-E8K2", input_size=8, in_channels=1)
    assert dtopp["params"] == topk["params"] + 4                       # one DRN log-scale per MoE layer


def test_table_has_a_row_per_model_and_strategy():
    rows = memory_table(("DiT-S/2", "DiT-S/2-E8K2"), world=8).splitlines()
    assert len(rows) == 2 + 4 + 2 and "fsdp x8" in rows[3]             # + ep x2 and ep x8 for the MoE model


# ----------------------------------------------------------------------------------------------- expert parallelism

def gelu_expert(D, ratio=4):
    """One gelu expert of width ratio x D: fc1, fc2 with biases."""
    H = ratio * D
    return 2 * D * H + H + D


def test_ep_with_one_gpu_per_group_is_ddp():
    m = training_memory("DiT-S/2-E8K2", world=8, ep=1)
    assert (m["ep"]["size"], m["ep"]["dp"]) == (1, 8)
    assert {k: m["ep"][k] for k in m["ddp"]} == m["ddp"]
    assert m["ep"]["experts"] == 20 * m["expert_params"]


@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_ep_bytes_hand_count_for_dit_s(N):
    """DiT-S/2-E8K2: 12 MoE layers of 8 gelu experts of width 4D (D = 384); everything else is replicated."""
    D, depth, E = 384, 12, 8
    experts = depth * E * gelu_expert(D)
    replicated = closed_form(D, depth, E) - experts
    m = training_memory("DiT-S/2-E8K2", world=8, ep=N)
    assert m["expert_params"] == experts
    e = m["ep"]
    held = replicated + depth * (E // N) * gelu_expert(D)
    assert e == {"params": 4 * held, "grads": 4 * held, "adamw": 8 * held, "ema": 4 * held, "persistent": 20 * held,
                 "experts": 20 * experts // N, "size": N, "dp": 8 // N}
    assert e["experts"] * N == 20 * experts                 # the expert part divides exactly by N


@pytest.mark.parametrize("N", [2, 4])
def test_an_ep_group_holds_every_expert_once(N):
    """Slicing the meta model's banks as the ep shards do (expert_range): the GPUs of a group together hold the
    routed experts exactly once, each GPU what training_memory says, and the rest is the same on every GPU."""
    with torch.device("meta"):
        model = build_model("DiT-S/2-E8K2")
    total = sum(p.numel() for l in moe_layers(model) for p in l.experts.parameters())
    per_gpu = []
    for rank in range(N):
        held = 0
        for layer in moe_layers(model):
            start, stop = expert_range(layer.num_experts, N, rank)
            held += sum(p[start:stop].numel() for p in layer.experts.parameters())
        per_gpu.append(held)
    m = training_memory("DiT-S/2-E8K2", world=8, ep=N)
    assert sum(per_gpu) == total == m["expert_params"]
    assert all(20 * h == m["ep"]["experts"] for h in per_gpu)
    assert m["ep"]["persistent"] - m["ep"]["experts"] == 20 * (m["params"] - total)


def test_ep_reads_the_experts_from_the_model_not_the_name():
    """Shared experts and a DTop-p router are replicated; fine-grained experts are counted at their width."""
    D, depth, E = 384, 12, 8
    shared = training_memory("DiT-S/2-E8K2", ep=8, num_shared_experts=1)
    plain = training_memory("DiT-S/2-E8K2", ep=8)
    assert shared["expert_params"] == plain["expert_params"] == depth * E * gelu_expert(D)
    assert shared["ep"]["persistent"] - plain["ep"]["persistent"] == 20 * depth * gelu_expert(D, 2)
    fine = training_memory("DiT-S/2-E32K8", ep=8, expert_hidden_ratio=1.0)
    assert fine["expert_params"] == depth * 32 * gelu_expert(D, 1)
    assert fine["ep"]["experts"] == 20 * depth * 4 * gelu_expert(D, 1)
    dtopp = training_memory("DiT-S/2-E8K2", routing=RoutingConfig(type="dtopp"), ep=2)
    assert dtopp["ep"]["persistent"] == training_memory("DiT-S/2-E8K2", ep=2)["ep"]["persistent"] + 20 * depth


@pytest.mark.parametrize("world,N,what", [(6, 3, "divisible by 3"), (6, 4, "multiple of 4"),
                                          (16, 16, "divisible by 16")])
def test_ep_that_does_not_split_raises_one_line(world, N, what):
    for f in (training_memory, step_traffic):
        with pytest.raises(ValueError, match=what) as e:
            f("DiT-S/2-E8K2", world, ep=N)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dense"):
        training_memory("DiT-S/2", 8, ep=2)


# ------------------------------------------------------------------------------------------------------- traffic

def s_parts(D=384, depth=12, E=8):
    """(all parameters, the blocks' parameters) of DiT-S/2-E8K2 by hand."""
    block = (3 * D * D + 3 * D + D * D + D) + (D * 6 * D + 6 * D) + (E * D + E * gelu_expert(D))
    return closed_form(D, depth, E), depth * block


@pytest.mark.parametrize("gc", [False, True])
def test_traffic_hand_formula_for_dit_s(gc):
    """DiT-S/2-E8K2 over W = 4 GPUs, ep groups of 2 (dp 2), 3 images of 256 tokens per GPU, bf16 all-to-all."""
    D, depth, E, W, N = 384, 12, 8, 4, 2
    n, blocks = s_parts()
    pad = 3 * D                  # the class table's 1001 rows are stored as 4 x 251: 3 padded rows of width D
    experts = depth * E * gelu_expert(D)
    t = step_traffic("DiT-S/2-E8K2", world=W, ep=N, batch=3, grad_checkpointing=gc)
    tokens = 3 * 256
    assert (t["tokens"], t["k"]) == (tokens, 2)
    assert t["ddp"]["all_reduce"] == pytest.approx(2 * 3 / 4 * 4 * n) and t["ddp"]["total"] == t["ddp"]["all_reduce"]
    # fsdp: blocks gathered for forward and backward, the root once; every gradient reduce-scattered; padded shards.
    assert t["fsdp"]["all_gather"] == pytest.approx(3 / 4 * 4 * (2 * blocks + (n - blocks) + pad))
    assert t["fsdp"]["reduce_scatter"] == pytest.approx(3 / 4 * 4 * (n + pad))
    assert t["fsdp"]["all_reduce"] == t["fsdp"]["all_to_all"] == 0
    e = t["ep"]
    assert e["expert_all_reduce"] == pytest.approx(2 * 1 / 2 * 4 * experts / N)
    assert e["all_reduce"] == pytest.approx(2 * 3 / 4 * 4 * (n - experts) + e["expert_all_reduce"])
    assert e["all_to_all"] == pytest.approx(depth * tokens * 2 * D * 2 * (1 / 2) * (6 if gc else 4))
    assert e["total"] == pytest.approx(e["all_reduce"] + e["all_to_all"]) and e["all_gather"] == 0


def test_traffic_edges():
    one = step_traffic("DiT-S/2-E8K2", world=1, ep=1)
    assert all(one[s]["total"] == 0 for s in ("ddp", "fsdp", "ep"))      # nothing to exchange on one GPU
    full = step_traffic("DiT-S/2-E8K2", world=8, ep=8)
    assert full["ep"]["expert_all_reduce"] == 0 and full["ep"]["dp"] == 1  # no replica of an expert shard
    fp32 = step_traffic("DiT-S/2-E8K2", world=8, ep=8, act_bytes=4, k=1.5)
    assert fp32["ep"]["all_to_all"] == pytest.approx(full["ep"]["all_to_all"] * 2 * 1.5 / 2)
    ckpt = step_traffic("DiT-S/2-E8K2", world=8, ep=8, grad_checkpointing=True)
    assert ckpt["ep"]["all_to_all"] == pytest.approx(1.5 * full["ep"]["all_to_all"])
    assert ckpt["fsdp"] == full["fsdp"] and ckpt["ddp"] == full["ddp"]  # a recompute gathers nothing more
    from_config = step_traffic("DiT-S/2-E8K2", world=8, ep=8, grad_checkpointing=None)
    assert from_config["ep"] == full["ep"]                                # the config's default: off
    fine = step_traffic("DiT-S/2-E32K8", world=8, ep=8, expert_hidden_ratio=1.0)
    assert fine["ep"]["all_to_all"] == pytest.approx(4 * full["ep"]["all_to_all"])   # k = 8: four times the pairs
    assert "ep" not in step_traffic("DiT-S/2", world=8)


def test_tables_have_the_ep_and_traffic_rows():
    rows = memory_table(("DiT-S/2", "DiT-S/2-E8K2"), world=8, ep=(2, 3, 8)).splitlines()
    assert len(rows) == 2 + 2 + 4                                         # ep x3 does not split 8 experts: no row
    assert "ep x2, dp x4" in rows[6] and "ep x8, dp x1" in rows[7]
    # The ep rows are added below each model; the ddp and fsdp rows stay as they were.
    assert [r for r in rows if "| ep x" not in r] == memory_table(("DiT-S/2", "DiT-S/2-E8K2"), 8, ep=()).splitlines()
    rows = traffic_table(("DiT-S/2-E8K2", ("DiT-S/2-E32K8", {"expert_hidden_ratio": 1.0})), world=8,
                         ep=(2, 8)).splitlines()
    assert len(rows) == 2 + 2 * 4 and rows[2].startswith("| DiT-S/2-E8K2 | ddp |")
    assert rows[6].startswith("| DiT-S/2-E32K8 (expert_hidden_ratio=1) | ddp |") and "ep x8, dp x1" in rows[9]
