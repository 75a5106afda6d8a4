"""dit_moe.memory: parameter counts against the meta-built model and a closed form, and the per-GPU byte arithmetic."""
import math

import pytest
import torch

from dit_moe.config import RoutingConfig
from dit_moe.memory import BYTES, _shard_numel, memory_table, training_memory
from dit_moe.registry import build_model, count_params


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
    assert len(rows) == 2 + 4 and "fsdp x8" in rows[3]
