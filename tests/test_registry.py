"""Registry: published parameter counts and the `models` listing."""
import pytest

from dit_moe.__main__ import main
from dit_moe.registry import count_params

PUBLISHED = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.1e6, "DiT-XL/2": 675.1e6}
PUBLISHED_GFLOPS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_paper(name):
    counts = count_params(name)  # 256px ImageNet: 32x32x4 latents, 1000 classes
    assert abs(counts["total_params"] / PUBLISHED[name] - 1) < 0.005
    assert counts["active_params"] == counts["total_params"]
    assert abs(counts["gflops"] / PUBLISHED_GFLOPS[name] - 1) < 0.01


def test_models_command_lists_every_size(capsys):
    assert main(["models", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    for name in ("DiT-T/2", "DiT-S/2", "DiT-XL/8", "DiT-B/2-E8K2"):
        assert name in out
    assert "675.1" in out
