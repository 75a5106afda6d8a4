"""Expert parallelism's dispatch (dit_moe.training.parallel.ep) against the single-process MoE layer, on CPU / gloo.

One launch of 2 processes (ep over both) and one of 4 (ep over all 4, and ep 2 inside a dp 2 x ep 2 DeviceMesh), forked
from the test process: it has imported torch and the training package once, so a launch takes about a second
instead of 4 x 4 s of imports on two cores (the children touch no pytest state and leave with os._exit). In
each ep group every process holds E/N experts of the same fp64 layer and routes its own batch; the single-process
reference -- the unsharded layer, run by every process on every group member's batch -- must give, within 1e-12:
  * each process's output and input gradient (the same as the full layer on that process's batch alone);
  * its router gradient (routing is local: the gradient of its own tokens' loss);
  * its expert shard's gradients: the matching slice of the full layer's expert gradients summed over the group's
    batches (every process's tokens routed to the shard contribute);
  * its routing sums (``routing_acc``: statistics and Default MoE output sums, from the outputs sent back), so the
    world all-reduce in ``routing_step`` keeps router state identical, as without expert parallelism.
Routers: Top-k, fixed Top-p (with a balance bias), DTop-p, expert choice, Top-k + Default MoE. Batches: random;
"one_skewed" (the first process's tokens all pick experts of its own shard: it sends nothing to the others, whose
experts get no token from it); "all_skewed" (every process picks the first shard's experts: the others receive no
row at all and their experts' gradients are zero). Expert choice cannot be skewed (each expert takes C tokens of
every image), so it runs the same batches with every process receiving rows from every process.
The training plan on a whole model (``_check_model``): gathered checkpoint state = the unsharded model bit for bit,
re-sharding from it restores the shard, and the sharded model samples (forward with guidance) as the gathered one.
"""
import copy
import multiprocessing
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dit_moe.config import ConfigError, RoutingConfig
from dit_moe.models.default_moe import DefaultVectors
import dit_moe.models.moe as moe_mod
from dit_moe.models.moe import ExpertBank, MoEMLP
from dit_moe.models.routers import DTopPRouter, ExpertChoiceRouter, ThresholdController, TopKRouter, TopPRouter
from dit_moe.registry import build_model
from dit_moe.training.parallel.ep import expert_range, shard_experts, shard_model_experts
from dit_moe.training.parallel.ep_train import ExpertParallel
from test_sampling import _randomise

D, E, HIDDEN, IMAGES, TOKENS = 8, 8, 8, 2, 6
TOL = dict(rtol=1e-12, atol=1e-12)
CASES = ("topk", "topp_bias", "dtopp", "expert_choice", "topk_default")
BATCHES = ("random", "one_skewed", "all_skewed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(case: str, dtype=torch.float64):
    """The full fp64 layer of ``case``, identical on every process: gate rows 0.3 noise + 3 x one-hot(e), so a token
    near one-hot(0) + one-hot(1) picks experts 0 and 1."""
    torch.manual_seed(0)
    controller = None
    if case.startswith("topk"):
        router = TopKRouter(D, E, top_k=2)
    elif case == "topp_bias":
        router = TopPRouter(D, E, threshold=0.6, balance_bias=True)
    elif case == "dtopp":
        controller = ThresholdController(E, target=2, num_layers=1)
        controller.threshold.fill_(0.55)
        router = DTopPRouter(D, E, controller, layer=0)
    else:
        router = ExpertChoiceRouter(D, E, top_k=2)
    default = DefaultVectors(E, D) if case == "topk_default" else None
    layer = MoEMLP(D, router, ExpertBank(E, D, HIDDEN), None, default).to(dtype).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.router.weight.copy_(0.3 * torch.randn(E, D, generator=g, dtype=dtype) + 3 * torch.eye(E, D))
        layer.experts.b_in.normal_(0, 0.1, generator=g)
        layer.experts.b_out.normal_(0, 0.1, generator=g)
        if default is not None:
            default.vectors.normal_(generator=g)
        if layer.router.balance_bias is not None:
            layer.router.balance_bias.copy_(torch.linspace(-0.02, 0.02, E))
    layer._controller = controller          # plain attribute: keeps the controller alive with the layer
    return layer


def _batch(batch: str, member: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, output gradient) of ep-group member ``member``, each (IMAGES, TOKENS, D)."""
    g = torch.Generator().manual_seed(1000 * seed + member)
    x = torch.randn(IMAGES, TOKENS, D, generator=g, dtype=dtype)
    if batch == "all_skewed" or (batch == "one_skewed" and member == 0):
        x = 0.3 * x + 2.0 * (torch.eye(D, dtype=dtype)[0] + torch.eye(D, dtype=dtype)[1])
    return x, torch.randn(IMAGES, TOKENS, D, generator=g, dtype=dtype)


def _run(layer, x, gy):
    """Forward + backward of sum(layer(x) * gy): (output, x grad, {param: grad}, routing sums)."""
    layer.zero_grad(set_to_none=True)
    layer.routing_acc.zero_()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * gy).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, layer.routing_acc.clone()


def _check_group(group, seed: int, tag: str, cases=CASES, dtype=torch.float64, tol=TOL) -> int:
    """Every case and batch on ep group ``group``; returns the number of comparisons made."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    start, stop = expert_range(E, size, me)
    checks = 0
    for case in cases:
        full = _layer(case, dtype)
        ep = _layer(case, dtype)
        shard_experts(ep, group)
        assert ep.experts.num_experts == E // size and torch.equal(ep.experts.w_in, full.experts.w_in[start:stop])
        for batch in BATCHES:
            where = f"{tag} {case} {batch} ep-rank {me}/{size}"
            data = [_batch(batch, s, seed, dtype) for s in range(size)]
            ref = [_run(full, *data[s]) for s in range(size)]
            if batch != "random" and case != "expert_choice":     # the batch really exercises the empty splits
                counts0 = full.router(data[0][0].reshape(-1, D)).counts
                assert counts0[E // size:].sum() == 0, f"{where}: member 0 sends to other processes"
                if batch == "all_skewed":
                    for s in range(1, size):
                        assert full.router(data[s][0].reshape(-1, D)).counts[E // size:].sum() == 0, where
            if batch == "random":      # a deepcopy (the EMA model) keeps the shard and the dispatcher's group
                copied = copy.deepcopy(ep)
                assert copied.dispatcher is ep.dispatcher and copied.experts.w_in is not ep.experts.w_in
                torch.testing.assert_close(copied(data[me][0]).detach(), ref[me][0], **tol, msg=f"{where}: copy")
            y, gx, grads, acc = _run(ep, *data[me])
            ry, rgx, rgrads, racc = ref[me]
            torch.testing.assert_close(y, ry, **tol, msg=f"{where}: output")
            torch.testing.assert_close(gx, rgx, **tol, msg=f"{where}: input gradient")
            torch.testing.assert_close(acc, racc, **tol, msg=f"{where}: routing sums")
            for name, grad in grads.items():
                if name.startswith("experts."):
                    expected = sum(r[2][name] for r in ref)[start:stop]
                else:
                    expected = rgrads[name]
                torch.testing.assert_close(grad, expected, **tol, msg=f"{where}: gradient of {name}")
                checks += 1
            if batch == "all_skewed" and me > 0 and case != "expert_choice":
                assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.startswith("experts.")), where
            checks += 3
    return checks


def _check_model(world: int, rank: int) -> int:
    """The training plan (``ExpertParallel``) on a whole fp64 DiT-T/2-E8K2 with DTop-p, for ep groups of 2 and of
    ``world``: its gathered state is the unsharded model's, bit for bit; a model re-sharded from that state holds
    the same shard; and the sharded model's sampling forward (guidance included) equals the gathered model's on each
    process's own batch (1e-12: the experts multiply the same rows in other groupings)."""
    accelerator = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"),
                                  is_main_process=rank == 0)
    checks = 0
    for size in sorted({2, world}):
        torch.manual_seed(0)
        full = _randomise(build_model("DiT-T/2-E8K2", RoutingConfig(type="dtopp"), input_size=8, in_channels=1,
                                      num_classes=10)).double()
        plan = ExpertParallel(accelerator, size)
        ep = plan.shard(copy.deepcopy(full))
        gathered = plan.full_state(ep)
        if rank == 0:
            reference = full.state_dict()
            assert gathered.keys() == reference.keys()
            assert all(torch.equal(v, reference[k]) for k, v in gathered.items()), f"ep {size}: gathered state"
        else:
            assert gathered == {}
        again = plan.shard(copy.deepcopy(full))
        with torch.no_grad():
            for p in again.parameters():
                p.zero_()
        plan.load_full_state(again, full.state_dict())
        assert all(torch.equal(v, ep.state_dict()[k]) for k, v in again.state_dict().items()), f"ep {size}: re-shard"
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
        t, y = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, 10, (4,), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ep.forward_with_cfg(x, t, y, 2.0), full.forward_with_cfg(x, t, y, 2.0), **TOL,
                                       msg=f"ep {size}: sampling forward")
        checks += 3
    return checks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One process of the launch (forked from pytest: the imports are inherited, so a process starts in
    milliseconds). Writes rank<r>.ok (the comparison counts) or rank<r>.err (the traceback) and leaves with
    os._exit, so that no pytest exit handler runs in the child."""
    code = 1
    try:
        # One intra-op thread, as DataLoader's forked workers do: the parent's OpenMP pool does not survive a fork.
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # A failed rank makes its peers' collectives time out instead of waiting forever.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        checks = [_check_group(None, seed=1, tag=f"ep over all {world}"), _check_model(world, rank)]
        if world == 2 and hasattr(torch.nn.functional, "grouped_mm"):
            # The grouped path (the GPU's) on each shard: torch's CPU grouped_mm runs fp32 only, checked at fp32
            # round-off; it needs the dispatcher's per-row local expert indices for the biases.
            moe_mod.USE_GROUPED_MM = True
            checks.append(_check_group(None, seed=3, tag="grouped_mm fp32", cases=("topk", "topp_bias"),
                                       dtype=torch.float32, tol=dict(rtol=1e-5, atol=1e-5)))
            assert moe_mod._grouped_mm_ok.get(("cpu", torch.float32, "gelu", E // 2, D, HIDDEN)), \
                "the fp32 shards did not run on grouped_mm"
        if world == 4:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
            dp = mesh.get_local_rank("dp")
            checks.append(_check_group(mesh.get_group("ep"), seed=2 + dp, tag=f"dp 2 x ep 2, dp row {dp}"))
        dist.destroy_process_group()
        Path(out_dir, f"rank{rank}.ok").write_text(" ".join(map(str, checks)))
        code = 0
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        os._exit(code)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_dispatch_equals_the_single_process_layer(world, tmp_path):
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)     # a hang guard only (a healthy launch takes seconds; gloo times out after 60 s)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(p.exitcode is None for p in procs), "a rank hung: killed after 300 s"
    errors = [(tmp_path / f"rank{r}.err") for r in range(world)]
    for r, (p, err) in enumerate(zip(procs, errors)):
        assert p.exitcode == 0, f"rank {r} failed:\n{err.read_text() if err.exists() else p.exitcode}"
    # 5 routers x 3 batches x (3 + the layer's parameters) comparisons, on every process and ep group
    for r in range(world):
        counts = [int(c) for c in (tmp_path / f"rank{r}.ok").read_text().split()]
        assert len(counts) == (3 if world == 4 or hasattr(torch.nn.functional, "grouped_mm") else 2)
        assert counts[1] == 3 * len({2, world})              # _check_model: gathered, re-sharded, forward
        assert all(c >= 2 * len(BATCHES) * 4 for i, c in enumerate(counts) if i != 1)


def test_expert_count_must_divide_over_the_ep_group():
    assert expert_range(8, 4, 3) == (6, 8)
    with pytest.raises(ConfigError, match="divisible by 3; the model has 8 experts"):
        expert_range(8, 3, 0)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        shard_model_experts(build_model("DiT-S/2", input_size=8, in_channels=1))
