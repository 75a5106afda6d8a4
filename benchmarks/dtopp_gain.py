"""The DTop-p control loop's plant gain at a checkpoint's operating point, g / E, in both threshold coordinates.

    python benchmarks/dtopp_gain.py CHECKPOINT_OR_RUN [...] [--batch 512] [--delta 0.01] [--seed 0]

For each checkpoint (a checkpoint folder or a run folder: its latest checkpoint), the training weights are
loaded, a batch of the run's training data is noised at uniform timesteps (the distribution the controller
sees in training), and the mean activated experts a(p) over all MoE layers is measured at the checkpoint's
threshold p* and at the thresholds whose log-odds are u* -/+ delta (global scope only). The central differences
da/du and da/dp = (da/du) / (p (1 - p)), divided by E, are the loop gains gamma of the controller's stability
condition gamma (2 Kp + Ki) < 2 in the log-odds and in the linear threshold space (docs/dtopp-controller.md).
One JSON line per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from diffusers import DDPMScheduler

from dit_moe.data import build_dataset
from dit_moe.models.routing_tap import RoutingTap
from dit_moe.weights.build import build_from_checkpoint
from dit_moe.weights.checkpoint import is_checkpoint, list_checkpoints


def _checkpoints(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if is_checkpoint(p):
            out.append(p)
        elif list_checkpoints(p):
            out.append(list_checkpoints(p)[-1])
        else:
            sys.exit(f"{p}: neither a checkpoint nor a run folder with checkpoints")
    return out


@torch.no_grad()
def measure(path: Path, batch: int, delta: float, seed: int) -> dict:
    model, ckpt = build_from_checkpoint(path, which="model")
    controller = getattr(model, "routing_controller", None)
    if controller is None or controller.threshold.numel() != 1:
        raise SystemExit(f"{path}: not a DTop-p model with a global threshold")
    data_cfg = ckpt.experiment.data
    dataset, _ = build_dataset(data_cfg.source, data_cfg.path, flip=False)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(dataset), (batch,), generator=g)
    x0 = torch.stack([dataset[int(i)][0] for i in idx])
    y = torch.stack([dataset[int(i)][1] for i in idx])
    t = torch.randint(0, 1000, (batch,), generator=g)
    x_t = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").add_noise(
        x0, torch.randn(x0.shape, generator=g), t)

    p_star = float(controller.threshold)
    tap = RoutingTap(model, buckets=1)          # the toolkit's one reader of router outputs

    def active(p: float) -> float:
        """Mean activated experts over all (token, MoE layer) pairs of the batch at threshold p."""
        controller.threshold.fill_(p)
        tap.reset()
        with tap:
            model(x_t, t, y)
        return tap.report()["mean"]

    u_star = math.log(p_star / (1 - p_star))
    lo, hi = (1 / (1 + math.exp(-(u_star + s * delta))) for s in (-1, 1))
    a_lo, a_star, a_hi = active(lo), active(p_star), active(hi)
    E = controller.num_experts
    gain_u = (a_hi - a_lo) / (2 * delta) / E
    scales = [float(r.scale()) for r in tap.routers if hasattr(r, "scale")]
    return {"checkpoint": str(path), "step": ckpt.step, "threshold": round(p_star, 4), "a": round(a_star, 4),
            "a_lo": round(a_lo, 4), "a_hi": round(a_hi, 4), "gain_logit_over_E": round(gain_u, 3),
            "gain_linear_over_E": round(gain_u / (p_star * (1 - p_star)), 3),
            "drn_scale": [round(s, 3) for s in scales], "target": controller.target, "delta": delta}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--delta", type=float, default=0.1, help="half-step in log-odds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for path in _checkpoints(args.paths):
        print(json.dumps(measure(path, args.batch, args.delta, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
