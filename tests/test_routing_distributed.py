"""Two CPU processes (gloo): router state stays identical across ranks that see different data.

Each rank trains the same small networks under DDP on its own data stream and calls ``routing_step`` with a
torch.distributed SUM all-reduce after every optimizer step: DTop-p + Default MoE + balance bias, and Top-k +
balance bias. The controller state (threshold, integral, measured), every layer's default vectors and every
router's balance bias must then be bitwise equal on both ranks.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dit_moe.config import ModelConfig, RoutingConfig
    from dit_moe.models.moe import build_controller, build_moe_mlp, collect_aux_loss, routing_step

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)                                              # identical initial weights on both ranks
    mc = ModelConfig(expert_hidden_ratio=2.0)

    class Net(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.routing_controller = build_controller(cfg, 4, 2, 2)
            self.moes = nn.ModuleList([build_moe_mlp(16, i, 4, 2, mc, cfg, self.routing_controller) for i in range(2)])
            self.out = nn.Linear(16, 1)

        def forward(self, x):
            for m in self.moes:
                x = x + m(x)
            return self.out(x)

    nets = {"dtopp": Net(RoutingConfig(type="dtopp", default_moe=True, default_beta=0.5, balance_bias=True,
                                       bias_rate=0.01)),
            "topk": Net(RoutingConfig(type="topk", balance_bias=True, bias_rate=0.01))}
    models = {k: DDP(n) for k, n in nets.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    g = torch.Generator().manual_seed(100 + rank)                     # different data per rank

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    state = {}
    for name, net in nets.items():
        local_means = []
        for _ in range(STEPS):
            for _micro in range(2):                                   # gradient accumulation: two micro-batches
                x = torch.randn(32 + 16 * rank, 16, generator=g)
                loss = models[name](x).pow(2).mean() + collect_aux_loss(net)[0]
                loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            local_means.append([m.routing_acc[:10].tolist() for m in net.moes])
            routing_step(net, all_reduce)
        state.update({f"{name}.{k}": v.tolist() for k, v in net.state_dict().items()
                      if "routing_controller" in k or "default_vectors" in k or "balance_bias" in k})
        state[f"{name}.local"] = local_means
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(state))
    dist.barrier()                       # both ranks done before the DDP reducers and the group are torn down
    del models
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_router_state_identical_across_two_ranks(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys; from test_routing_distributed import _worker; _worker(int(sys.argv[1]), sys.argv[2])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = [p.communicate()[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name in ("dtopp", "topk"):
        local = [s.pop(f"{name}.local") for s in states]
        assert local[0] != local[1], f"{name}: the ranks must have seen different routing statistics"
    assert states[0].keys() == states[1].keys()
    assert {"dtopp.routing_controller.threshold", "dtopp.moes.0.default_vectors.vectors",
            "dtopp.moes.1.router.balance_bias", "topk.moes.0.router.balance_bias"} <= states[0].keys()
    for key in states[0]:
        assert states[0][key] == states[1][key], f"{key} differs between ranks"
    assert states[0]["dtopp.routing_controller.threshold"] != [0.5], "the controller moved"
    assert torch.tensor(states[0]["dtopp.moes.1.default_vectors.vectors"]).abs().sum() > 0
    for key in ("dtopp.moes.0.router.balance_bias", "topk.moes.1.router.balance_bias"):
        assert torch.tensor(states[0][key]).abs().sum() > 0, f"{key} never moved"
