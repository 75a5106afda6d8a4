"""Sparse upcycling and train.init_from: the upcycled model equals the dense one at step 0 exactly where
dit_moe.weights.upcycle.exactness says so (float64, every router, Default MoE, copies and partitions), seeded noise,
one training step per router from an upcycled checkpoint, and refusals."""
import pytest
import torch

from dit_moe.config import load_config
from dit_moe.diffusion import GaussianDiffusion
from dit_moe.models import moe
from dit_moe.registry import build_model
from dit_moe.weights.build import build_from_checkpoint
from dit_moe.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dit_moe.weights.init_from import load_init_weights
from dit_moe.weights.upcycle import main, upcycle

TOL = 1e-12
SMALL = dict(input_size=4, in_channels=4, num_classes=10)


def randomised(model, seed):
    """Every parameter random (DiT's adaLN-Zero init would make the blocks, and so the MLPs, the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    save_checkpoint(path, randomised(build_model("DiT-T/2", **SMALL), 0), randomised(build_model("DiT-T/2", **SMALL), 1))
    return path


def probe():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 10, 250, 500, 800, 999]),
            torch.tensor([0, 3, 9, 10, 1, 2]))


def output(ckpt, which="ema"):
    model, _ = build_from_checkpoint(ckpt, which=which)
    with torch.no_grad():
        return model.double()(*probe())


def run(dense, tmp_path, model, routing, *overrides, **kw):
    out = tmp_path / f"up-{len(list(tmp_path.iterdir()))}"
    upcycle(str(dense), model, str(out), routing=routing, overrides=list(overrides), **kw)
    return out


def test_dense_reference_is_not_trivial(dense):
    """The MLPs matter in the probe: zeroing them changes the output (so exactness below is a real check)."""
    model, _ = build_from_checkpoint(dense)
    model.double()
    x, t, y = probe()
    with torch.no_grad():
        full = model(x, t, y)
        for block in model.blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        assert (model(x, t, y) - full).abs().max() > 0.05 and full.abs().max() > 0.3


@pytest.mark.parametrize("name, routing, overrides", [
    ("DiT-T/2-E4K2", "topk", []),
    ("DiT-T/2-E4K2", "topp", []),
    ("DiT-T/2-E4K2", "dtopp", []),
    ("DiT-T/2-E4K2", "topk", ["routing.default_moe=true"]),
    ("DiT-T/2-E4K2", "topp", ["routing.default_moe=true", "routing.default_mode=forward"]),
    ("DiT-T/2-E4K2", "dtopp", ["routing.default_moe=true", "routing.default_mode=forward"]),
    ("DiT-T/2-E8K1", "dtopp", ["routing.scope=layer", "model.moe_every=2"]),
])
def test_copies_are_exact_for_every_router(dense, tmp_path, name, routing, overrides):
    up = run(dense, tmp_path, name, routing, *overrides)
    ckpt = load_checkpoint(up)
    assert ckpt.meta["exact_at_step_0"] and ckpt.routing_config.renormalize is True and ckpt.step == 0
    for which in ("ema", "model"):                       # the EMA copy was upcycled from the source's EMA
        assert (output(up, which) - output(dense, which)).abs().max().item() <= TOL


@pytest.mark.parametrize("name, routing, ratio, overrides, init, exact", [
    ("DiT-T/2-E4K4", "topk", 1.0, [], "zero", True),                          # 4 partitions, all 4 experts active
    ("DiT-T/2-E8K2", "topp", 2.0, ["routing.threshold=1.0"], "zero", True),   # 2 partitions x 4 copies, all active
    ("DiT-T/2-E8K2", "topk", 2.0, [], "random", False),                       # 2 of 8 per token: an estimate
    ("DiT-T/2-E8K2", "topp", 2.0, [], "random", False),                       # threshold 0.4: a few of 8
    ("DiT-T/2-E8K2", "dtopp", 2.0, [], "random", False),
    ("DiT-T/2-E4K4", "topk", 1.0, [], "random", False),                       # all active, unequal weights
])
def test_partitioned_experts_exact_only_when_all_are_active(dense, tmp_path, name, routing, ratio, overrides, init,
                                                            exact):
    up = run(dense, tmp_path, name, routing, f"model.expert_hidden_ratio={ratio}", *overrides, router_init=init)
    ckpt = load_checkpoint(up)
    assert ckpt.meta["partitions"] == int(4 / ratio) and ckpt.meta["exact_at_step_0"] is exact
    diff = (output(up) - output(dense)).abs().max().item()
    assert diff <= TOL if exact else diff > 1e-3


def test_not_renormalised_is_not_exact_and_says_so(dense, tmp_path, capsys):
    up = run(dense, tmp_path, "DiT-T/2-E4K2", "topk", "routing.renormalize=false")
    assert "renormalize=false" in capsys.readouterr().err
    assert not load_checkpoint(up).meta["exact_at_step_0"]
    assert (output(up) - output(dense)).abs().max().item() > 1e-3


def test_noise_breaks_symmetry_reproducibly(dense, tmp_path):
    a = run(dense, tmp_path, "DiT-T/2-E4K2", "topk", noise=0.01, seed=0)
    b = run(dense, tmp_path, "DiT-T/2-E4K2", "topk", noise=0.01, seed=0)
    c = run(dense, tmp_path, "DiT-T/2-E4K2", "topk", noise=0.01, seed=1)
    sa, sb, sc = (load_checkpoint(p).state_dict("model") for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = sa["blocks.1.mlp.experts.w_in"]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w, sc["blocks.1.mlp.experts.w_in"])
    rel = (w[0] - w[1]).std() / w[0].std()
    assert 0.005 < rel < 0.03                                        # two independent 1% perturbations
    # The EMA copy got the same draws as the model.
    src = load_checkpoint(dense)
    ema = load_checkpoint(a).state_dict("ema")["blocks.1.mlp.experts.w_in"]
    delta_model = w - src.state_dict("model")["blocks.1.mlp.fc1.weight"].t()
    delta_ema = ema - src.state_dict("ema")["blocks.1.mlp.fc1.weight"].t()
    assert torch.allclose(delta_model, delta_ema, atol=1e-6) and delta_model.abs().max() > 0
    diff = (output(a) - output(dense)).abs().max().item()
    assert 0 < diff < 0.05


# ---------------------------------------------------------------------------------------------------------
#                                 train.init_from and one training step
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routing, overrides", [("topk", []), ("topp", []), ("dtopp", []),
                                                ("dtopp", ["routing.default_moe=true"])])
def test_one_training_step_from_upcycled_checkpoint(dense, tmp_path, routing, overrides):
    up = run(dense, tmp_path, "DiT-T/2-E4K2", routing, *overrides, noise=0.01)
    exp = load_checkpoint(up).experiment
    model, ema = build_model(exp), build_model(exp)
    src = load_init_weights(model, ema, up)
    assert src.path == up
    ema_state = load_checkpoint(up).state_dict("ema")
    assert all(torch.equal(model.state_dict()[k], ema_state[k]) and torch.equal(ema.state_dict()[k], ema_state[k])
               for k in ema_state)

    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diffusion = GaussianDiffusion(learn_sigma=True)
    x0, y = torch.randn(8, 4, 4, 4), torch.randint(0, 10, (8,))
    t = diffusion.sample_timesteps(8, "cpu")
    losses = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x0, t)
    aux, _ = moe.collect_aux_loss(model)
    loss = losses["loss"].mean() + aux
    loss.backward()
    router = model.blocks[0].mlp.router
    assert torch.isfinite(loss) and aux > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert router.weight.grad.abs().max() > 0 and model.blocks[0].mlp.experts.w_in.grad.abs().max() > 0
    before = router.weight.detach().clone()
    optimizer.step()
    stats = moe.routing_step(model)
    assert not torch.equal(before, router.weight) and stats["mean_active"].min() >= 1
    if routing == "dtopp":
        assert not torch.equal(model.routing_controller.integral, torch.zeros(1))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x0, t, y)).all()


def test_init_from_refuses_what_does_not_fit(dense, tmp_path):
    cfg = load_config(overrides=["model.name=DiT-T/2-E4K2", "model.input_size=4", "model.num_classes=10",
                                 f"train.init_from={dense}"])
    assert cfg.train.init_from == str(dense)
    model, ema = build_model(cfg), build_model(cfg)
    with pytest.raises(CheckpointError, match=r"dit-moe upcycle .* --model DiT-T/2-E4K2"):
        load_init_weights(model, ema, dense)
    up = run(dense, tmp_path, "DiT-T/2-E4K2", "topk")
    dtopp = load_config(overrides=["model.name=DiT-T/2-E4K2", "model.input_size=4", "model.num_classes=10",
                                   "routing.type=dtopp"])
    with pytest.raises(CheckpointError, match=r"missing .*log_scale.*routing.type topk there, dtopp here"):
        load_init_weights(build_model(dtopp), build_model(dtopp), up)
    shifted = build_model("DiT-T/2", **SMALL, timestep_freq_shift=1)
    with pytest.raises(CheckpointError, match="model.timestep_freq_shift is 0 in .* but 1 in the config"):
        load_init_weights(shifted, build_model("DiT-T/2", **SMALL, timestep_freq_shift=1), dense)
    # Shapes that need not match: another input size and the raw weights instead of the EMA.
    bigger = build_model("DiT-T/2", input_size=8, in_channels=4, num_classes=10)
    load_init_weights(bigger, build_model("DiT-T/2", input_size=8, in_channels=4, num_classes=10), dense, which="model")
    assert torch.equal(bigger.blocks[0].mlp.fc1.weight, load_checkpoint(dense).state_dict("model")["blocks.0.mlp.fc1.weight"])


# ---------------------------------------------------------------------------------------------------------
#                                             Bad requests
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "DiT-S/2-E4K2"], "does not keep the source DiT-T/2 (4 x 128, patch 2); use DiT-T/2-E4K2"),
    (["--model", "DiT-T/4-E4K2"], "use DiT-T/2-E4K2"),
    (["--model", "DiT-T/2"], "is dense"),
    (["--model", "DiT-T/2-E4K2", "model.expert_kind=swiglu"], "SwiGLU experts cannot hold a copy"),
    (["--model", "DiT-T/2-E4K2", "model.num_shared_experts=1"], "shared expert has no counterpart"),
    (["--model", "DiT-T/2-E4K2", "model.expert_hidden_ratio=3"], "do not partition the dense MLP"),
    (["--model", "DiT-T/2-E2K1", "model.expert_hidden_ratio=1"], "E must be a multiple of 4"),
    (["--model", "DiT-T/2-E4K2", "model.num_classes=5"], "model.num_classes=5 differs from the source's 10"),
    (["--model", "DiT-T/2-E4K2", "--routing", "dtopp", "--router-init", "zero"], "use --router-init random"),
    (["--model", "DiT-T/2-E4K2", "train.nope=1"], "unknown key(s) nope"),
])
def test_bad_requests_are_refused(dense, tmp_path, capsys, argv, message):
    assert main([str(dense), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_moe_source_and_existing_output(dense, tmp_path, capsys):
    up = run(dense, tmp_path, "DiT-T/2-E4K2", "topk")
    assert main([str(up), "--model", "DiT-T/2-E8K2", "--out", str(tmp_path / "again")]) == 2
    assert "already an MoE model (DiT-T/2-E4K2)" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main([str(dense), "--model", "DiT-T/2-E4K2", "--out", str(busy), *extra]) == 2
        assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert "not empty; nothing written" in capsys.readouterr().err
    assert main([str(dense), "--model", "DiT-T/2-E4K2", "--out", str(up)]) == 2
    assert main([str(dense), "--model", "DiT-T/2-E8K2", "--out", str(up), "--overwrite"]) == 0
    assert load_checkpoint(up).model_config.name == "DiT-T/2-E8K2"


def test_upcycle_reads_a_dit_file_directly(tmp_path):
    model = randomised(build_model("DiT-T/2", **SMALL), 4)
    state = {k: v for k, v in model.state_dict().items()}
    state["pos_embed"] = model.pos_embed.clone()
    torch.save(state, tmp_path / "dit.pt")
    assert main([str(tmp_path / "dit.pt"), "--model", "DiT-T/2-E4K2", "--routing", "dtopp",
                 "--out", str(tmp_path / "up")]) == 0
    ckpt = load_checkpoint(tmp_path / "up")
    assert ckpt.meta["source_meta"]["source_format"] == "facebookresearch/DiT"
    assert ckpt.experiment.sample.guidance_channels == 3 and ckpt.data_info["vae"] == "stabilityai/sd-vae-ft-ema"
    ref = model.double().eval()
    with torch.no_grad():
        assert (output(tmp_path / "up") - ref(*probe())).abs().max().item() <= TOL
