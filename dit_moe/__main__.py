"""`python -m dit_moe models`: the registry with parameters and compute per image."""
from __future__ import annotations

import argparse
import sys

from .config import ModelConfig, RoutingConfig
from .registry import count_params, model_names


def list_models(input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> list[dict]:
    rows = []
    for name in model_names():
        cfg = ModelConfig(name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        rows.append(count_params(cfg, RoutingConfig()))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dit-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registry names with total/active parameters and GFLOPs per image")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px ImageNet through the SD VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)

    if args.command == "models":
        print(f"{'name':<18}{'params (M)':>12}{'active (M)':>12}{'GFLOPs':>10}")
        for r in list_models(args.input_size, args.in_channels, args.num_classes):
            print(f"{r['name']:<18}{r['total_params'] / 1e6:>12.1f}{r['active_params'] / 1e6:>12.1f}{r['gflops']:>10.2f}")
        print(f"\nlatent {args.input_size}x{args.input_size}x{args.in_channels}, {args.num_classes} classes; "
              "MoE names: -E<experts>K<active> (experts: GELU MLPs of width 4D unless model.expert_kind/expert_hidden_ratio "
              "say otherwise); active = K routed experts per MoE layer; GFLOPs are multiply-accumulates per image, "
              "the unit of the DiT paper.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
