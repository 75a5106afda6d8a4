"""The numerics of the training-step speed-ups (benchmarks/cpu_step.py): segment experts and the fused AdamW."""
import torch

from dit_moe.config import TrainConfig
from dit_moe.models.experts import ExpertBank
from dit_moe.training.setup import build_optimizer


def _reference(bank: ExpertBank, x: torch.Tensor, sizes):
    """Each expert by plain autograd on its segment, outputs concatenated."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        h = x[start:start + n] @ bank.w_in[e]
        if bank.b_in is not None:
            h = h + bank.b_in[e]
        y = bank.activation(h) @ bank.w_out[e]
        out.append(y + bank.b_out[e] if bank.b_out is not None else y)
        start += n
    return torch.cat(out)


def test_segment_experts_match_autograd_and_zero_the_gradients_of_empty_experts():
    for kind in ("gelu", "swiglu"):
        torch.manual_seed(0)
        bank = ExpertBank(5, 12, 20, kind)
        sizes = (7, 0, 3, 0, 9)                       # two experts without tokens
        x = torch.randn(sum(sizes), 12, requires_grad=True)
        g = torch.randn(sum(sizes), 12)
        grads = {}
        for how, fn in (("segments", lambda: bank(x, sizes)), ("reference", lambda: _reference(bank, x, sizes))):
            bank.zero_grad(set_to_none=True)
            x.grad = None
            y = fn()
            y.backward(g)
            grads[how] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in bank.named_parameters()})
        (ys, gxs, gps), (yr, gxr, gpr) = grads["segments"], grads["reference"]
        assert torch.allclose(ys, yr, atol=1e-6) and torch.allclose(gxs, gxr, atol=1e-6)
        for name, grad in gps.items():
            assert torch.allclose(grad, gpr[name], atol=1e-6), (kind, name)
            assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0   # exact zeros


def test_fused_adamw_tracks_the_per_parameter_loop():
    """build_optimizer's fused AdamW against torch's default loop: the same update up to fp32 round-off."""
    torch.manual_seed(0)
    shapes = [(8, 16, 32), (32,), (1,), (64, 8)]
    params = {how: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                    for i, s in enumerate(shapes)] for how in ("fused", "loop")}
    t = TrainConfig(lr=1e-3, weight_decay=0.01)
    fused = build_optimizer(params["fused"], t)
    loop = torch.optim.AdamW(params["loop"], lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for how, opt in (("fused", fused), ("loop", loop)):
            for p, gr in zip(params[how], grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(params["fused"], params["loop"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
