"""The prepared GPU check: CUDA tests, training throughput and MFU, MoE/dense at equal active FLOPs, sampling speed.

    python benchmarks/gpu_check.py                                  # one H100/H200: sized for <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny              # the same code on tiny models (tests, any CPU)

Writes ``--out`` (default gpu_check.json) and prints a table (also written next to it, .txt). Sections:
  tests     ``pytest -m cuda tests/test_cuda.py`` in a subprocess: grouped_mm vs the segment loop (fp32, bf16,
            forward and gradients), no host sync in Top-k under torch.cuda.set_sync_debug_mode("error"), compiled
            vs eager, a few bf16 training steps of each router.
  train     one training step as the trainer takes it (bf16 autocast, diffusion loss + router aux loss, backward,
            grad clip 1.0, AdamW, routing_step) at 32x32x4 latents (256 tokens), --batch images, for DiT-XL/2,
            DiT-XL/2-E8K2 (Top-k; DTop-p at target 2) and DiT-XL/2-E1K1 with one 8D expert (the dense arm of equal
            active FLOPs: 2 experts of 4D = one of 8D), eager and compiled (dit_moe.models.compile): images/s, step
            ms (mean of --steps after --warmup), peak memory, compile s (first compiled step - an eager step) and
            MFU = 3 x forward FLOPs/image (2 x the registry's MACs, count_params) x images/s / the device's dense
            bf16 peak (PEAK_BF16; unknown device: null).
  ratios    E8K2 Top-k step / E1K1-8D step (the issue's goal: <= 1.15) and / DiT-XL/2, eager and compiled.
  ep        expert parallelism, only with 2 or more GPUs: benchmarks/ep_step.py under torchrun over every GPU (bf16,
            DiT-S/2-E8K2 Top-k at 32x32x4, 32 images per GPU, --ep-steps timed steps, within what is left of
            --budget-s and at most --ep-timeout-s): ddp vs train.expert_parallel 2 and W vs the dense E1K1-8D arm --
            tokens/s, all-to-all share of the step, MoE/dense and ep/ddp step ratios (ep_step's JSON is kept whole).
            With one GPU (or on the CPU) the section is recorded as skipped, with the reason.
  sampling  DiT-XL/2 images/s with DDPM-250 and DPM-Solver++ 25 steps (the fastest sampler: 25 model calls), CFG 1.5,
            as dit-moe sample runs them (fp32), --sample-batch images.
Weights are random (DiT's init): speed does not depend on them. The DDPM loss and samplers use diffusers; where it is
not installed the step uses the plain epsilon-MSE (the same model work) and sampling is reported as skipped.
Every section records its own error instead of stopping the check; --budget-s skips what would start after it.
The exit code is 1 if a test or section failed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dit_moe.config import ExperimentConfig, ModelConfig, RoutingConfig, SampleConfig  # noqa: E402
from dit_moe.registry import build_model, count_params  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by device name. H100 PCIe / NVL differ from SXM: unknown (null).
PEAK_BF16 = {"H200": 989e12, "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "A100": 312e12}
GOALS = {"moe_over_dense_equal_active_max": 1.15, "dense_mfu_compiled_min": 0.40}


def peak_bf16(device_name: str):
    for key, peak in PEAK_BF16.items():
        if key in device_name:
            return peak
    return None


class Clock:
    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.start, self.budget = device, time.perf_counter(), budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def arms(tiny: bool) -> list[dict]:
    size = "T" if tiny else "XL"
    return [
        {"arm": f"DiT-{size}/2", "name": f"DiT-{size}/2", "routing": None, "model": {}},
        {"arm": f"DiT-{size}/2-E8K2 topk", "name": f"DiT-{size}/2-E8K2", "routing": RoutingConfig(type="topk"),
         "model": {}},
        {"arm": f"DiT-{size}/2-E8K2 dtopp(2)", "name": f"DiT-{size}/2-E8K2",
         "routing": RoutingConfig(type="dtopp", target=2.0), "model": {}},
        {"arm": f"DiT-{size}/2-E1K1 8D", "name": f"DiT-{size}/2-E1K1", "routing": RoutingConfig(type="topk"),
         "model": {"expert_hidden_ratio": 8.0}},
    ]


# ---------------------------------------------------------------------------------------------------------
#                                               CUDA tests
# ---------------------------------------------------------------------------------------------------------

def run_tests(timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", os.path.join(REPO, "tests", "test_cuda.py"),
               "-p", "no:cacheprovider", f"--junitxml={xml}"]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        out = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
               "tail": (proc.stdout + proc.stderr)[-3000:]}
        if os.path.exists(xml):
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            cases = suite.findall("testcase")
            out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
            bad = [(c, c.find("failure") if c.find("failure") is not None else c.find("error")) for c in cases]
            out["failed"] = [f"{c.get('name')}: {e.get('message', '')[:300]}" for c, e in bad if e is not None]
        return out


# ---------------------------------------------------------------------------------------------------------
#                                          Training throughput
# ---------------------------------------------------------------------------------------------------------

def _objective(cfg: ExperimentConfig):
    """The DDPM hybrid loss when diffusers is installed; else None (the step uses the plain epsilon-MSE)."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    from dit_moe.diffusion import build_objective
    return build_objective(cfg, learn_sigma=True)


def _loss(model, objective, x, y):
    if objective is not None:
        return objective.training_losses(lambda xt, tt: model(xt, tt, y), x)["loss"].mean()
    # x_t = sqrt(a) x0 + sqrt(1 - a) eps at random t of DiT's linear schedule; the epsilon half of the output
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    betas = torch.linspace(1e-4, 0.02, 1000, device=x.device, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    eps = torch.randn_like(x)
    out = model(a.sqrt() * x + (1 - a).sqrt() * eps, t, y)
    return (out[:, : x.shape[1]].float() - eps).square().mean()


def train_arm(arm: dict, compiled: bool, args, clock: Clock) -> dict:
    from dit_moe.models.compile import compile_blocks
    from dit_moe.models.moe import collect_aux_loss, routing_stats, routing_step

    device, C, S = clock.device, 4, (8 if args.tiny else 32)
    mc = ModelConfig(name=arm["name"], input_size=S, in_channels=C, num_classes=1000, **arm["model"])
    cfg = ExperimentConfig(model=mc, routing=arm["routing"] or RoutingConfig())
    torch.manual_seed(0)
    with device:                                     # initialised where it runs: XL-E8K2 has 2.5B parameters
        model = build_model(cfg).train()
    if compiled:
        compile_blocks(model, backend=args.compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = _objective(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, C, S, S, device=device, generator=g)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = _loss(model, objective, x, y)
            loss = loss + collect_aux_loss(model)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        routing_step(model)

    clock.sync()
    t0 = time.perf_counter()
    step()
    clock.sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock.sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    clock.sync()
    step_s = (time.perf_counter() - t0) / args.steps
    c = count_params(cfg)
    flops_per_image = 2 * c["gflops"] * 1e9                  # the registry counts multiply-accumulates
    images_s = args.batch / step_s
    peak = peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    stats = routing_stats(model, warn=False)
    out = {"arm": arm["arm"], "compiled": compiled, "batch": args.batch, "tokens": (S // 2) ** 2,
           "params_total_M": round(c["total_params"] / 1e6, 1), "params_active_M": round(c["active_params"] / 1e6, 1),
           "fwd_gflops_per_image": round(flops_per_image / 1e9, 2), "step_ms": round(1e3 * step_s, 2),
           "images_per_s": round(images_s, 2), "first_step_s": round(first, 2),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
           "mfu": round(3 * flops_per_image * images_s / peak, 4) if peak else None,
           "mean_active_experts": round(float(stats["mean_active"].mean()), 3) if "mean_active" in stats else None,
           "loss": "ddpm hybrid" if objective is not None else "epsilon mse (diffusers not installed)"}
    del model, opt
    return out


def train_section(args, clock: Clock, rows: list, errors: list) -> None:
    import torch._dynamo

    eager_ms = {}
    for compiled in (False, True):
        for arm in arms(args.tiny):
            label = f"train {arm['arm']} {'compiled' if compiled else 'eager'}"
            if clock.left() < (60 if compiled and not args.tiny else 0):
                rows.append({"arm": arm["arm"], "compiled": compiled, "skipped": "time budget"})
                continue
            try:
                r = train_arm(arm, compiled, args, clock)
                if compiled and arm["arm"] in eager_ms:
                    r["compile_s"] = round(r["first_step_s"] - eager_ms[arm["arm"]] / 1e3, 1)
                else:
                    eager_ms[arm["arm"]] = r["step_ms"]
                rows.append(r)
            except Exception as e:                                   # recorded, printed, and the exit code says so
                errors.append({"section": label, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()[-2000:]})
                rows.append({"arm": arm["arm"], "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                gc.collect()
                if clock.device.type == "cuda":
                    torch.cuda.empty_cache()
                if compiled:        # the next arm's blocks start a fresh dynamo cache (inductor's disk cache stays)
                    torch._dynamo.reset()


def ratios(rows: list, tiny: bool) -> dict:
    size = "T" if tiny else "XL"
    out = {}
    for compiled in (False, True):
        ms = {r["arm"]: r["step_ms"] for r in rows if r.get("compiled") == compiled and "step_ms" in r}
        tag = "compiled" if compiled else "eager"
        moe, equal, dense = (ms.get(f"DiT-{size}/2-E8K2 topk"), ms.get(f"DiT-{size}/2-E1K1 8D"),
                             ms.get(f"DiT-{size}/2"))
        out[f"moe_over_equal_active_{tag}"] = round(moe / equal, 3) if moe and equal else None
        out[f"moe_over_dense_{tag}"] = round(moe / dense, 3) if moe and dense else None
    dense_c = [r for r in rows if r.get("arm") == f"DiT-{size}/2" and r.get("compiled") and "mfu" in r]
    out["goals"] = {
        "moe_over_equal_active_compiled<=1.15": None if out["moe_over_equal_active_compiled"] is None else
        out["moe_over_equal_active_compiled"] <= GOALS["moe_over_dense_equal_active_max"],
        "dense_mfu_compiled>=0.40": None if not dense_c or dense_c[0]["mfu"] is None else
        dense_c[0]["mfu"] >= GOALS["dense_mfu_compiled_min"]}
    return out


# ---------------------------------------------------------------------------------------------------------
#                                          Expert parallelism
# ---------------------------------------------------------------------------------------------------------

def ep_skip_reason(device: torch.device) -> str | None:
    """Why the ep section cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"{device.type} device (expert parallelism is checked on 2 or more GPUs)"
    n = torch.cuda.device_count()
    if n < 2:
        return f"{n} GPU (expert parallelism needs 2 or more)"
    return None


def ep_command(args, gpus: int, out: str, port: int) -> list[str]:
    """torchrun over ``gpus`` processes of benchmarks/ep_step.py, sized for the check (bf16)."""
    size = ["--model", "DiT-T/2-E8K2", "--input-size", "8", "--steps", "3", "--warmup", "1"] if args.tiny else \
        ["--model", "DiT-S/2-E8K2", "--input-size", "32", "--steps", str(args.ep_steps), "--warmup", "3"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr",
            "127.0.0.1", "--master_port", str(port), os.path.join(REPO, "benchmarks", "ep_step.py"), "--bf16",
            *size, "--out", out]


def ep_summary(ep: dict) -> dict:
    """The figures the check reports from ep_step's JSON: per arm tokens/s, all-to-all share, ratios."""
    arms = {r["arm"]: r for r in ep["arms"]}
    out = {r["arm"]: {"tokens_per_s": r["tokens_per_s"], "step_ms": r["step_ms_median"],
                      "a2a_share": r["a2a_share"], "x_ddp": r["x_ddp"], "x_dense": r["x_dense"],
                      "active_experts": r["active_experts_per_token"]} for r in ep["arms"]}
    out["moe_over_dense_ddp"] = arms["ddp"]["x_dense"] if "ddp" in arms else None
    return out


def ep_section(args, clock: Clock) -> dict:
    import socket

    reason = ep_skip_reason(clock.device)
    if reason is not None:
        return {"skipped": reason}
    if clock.left() < 60:
        return {"skipped": f"time budget ({clock.left():.0f} s of --budget-s left)"}
    gpus = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ep_step.json")
        cmd = ep_command(args, gpus, out, port)
        timeout = max(30.0, min(args.ep_timeout_s, clock.left()))
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        record = {"gpus": gpus, "command": " ".join(cmd[1:]), "returncode": proc.returncode,
                  "seconds": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0 or not os.path.exists(out):
            record["error"] = f"ep_step.py exited with {proc.returncode}"
            record["tail"] = (proc.stdout + proc.stderr)[-3000:]
            return record
        with open(out) as fh:
            record["result"] = json.load(fh)
    record["summary"] = ep_summary(record["result"])
    return record


def ep_lines(ep: dict) -> list[str]:
    if "skipped" in ep or "error" in ep:
        return [f"ep: skipped: {ep['skipped']}" if "skipped" in ep else f"ep: ERROR {ep['error']}"]
    r = ep["result"]
    lines = [f"ep ({ep['gpus']} GPUs, {r['setup']['model']} {r['setup']['routing']}, bf16, global batch "
             f"{r['setup']['batch']}; ep_step.py, {ep['seconds']} s)",
             f"  {'arm':<7} {'tokens/s':>10} {'step ms':>9} {'a2a %':>6} {'x ddp':>6} {'x dense':>7} {'experts':>7}"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for a in r["arms"]:
        lines.append(f"  {a['arm']:<7} {a['tokens_per_s']:10.0f} {a['step_ms_median']:9.1f} "
                     f"{100 * a['a2a_share']:6.1f} {f(a['x_ddp'], '6.3f'):>6} {f(a['x_dense'], '7.3f'):>7} "
                     f"{f(a['active_experts_per_token'], '7.2f'):>7}")
    lines += [f"  {n}" for n in r.get("notes", [])]
    return lines


# ---------------------------------------------------------------------------------------------------------
#                                                Sampling
# ---------------------------------------------------------------------------------------------------------

def sampling_section(args, clock: Clock, rows: list, errors: list) -> None:
    from dit_moe.diffusion import build_objective
    from dit_moe.sampling import make_generators, sample_latents

    name = "DiT-T/2" if args.tiny else "DiT-XL/2"
    steps = {"ddpm": 10 if args.tiny else 250, "dpm": 5 if args.tiny else 25}
    if importlib.util.find_spec("diffusers") is None:
        rows.extend({"model": name, "sampler": s, "steps": n, "skipped": "diffusers is not installed (the DDPM "
                     "samplers are diffusers schedulers)"} for s, n in steps.items())
        return
    S = 8 if args.tiny else 32
    cfg = ExperimentConfig(model=ModelConfig(name=name, input_size=S, in_channels=4, num_classes=1000))
    torch.manual_seed(0)
    with clock.device:
        model = build_model(cfg).eval()
    objective = build_objective(cfg, learn_sigma=True)
    labels = torch.arange(args.sample_batch) % 1000
    for sampler, n in steps.items():
        if clock.left() < 0:
            rows.append({"model": name, "sampler": sampler, "steps": n, "skipped": "time budget"})
            continue
        try:
            settings = SampleConfig(sampler=sampler, steps=n, cfg_scale=1.5)

            def run():
                gens = make_generators(0, range(args.sample_batch))
                sample_latents(model, labels, gens, settings, (4, S, S), device=clock.device, objective=objective)

            if args.tiny:
                run()                                    # warm-up; at XL the 250 steps are their own warm-up
            clock.sync()
            t0 = time.perf_counter()
            run()
            clock.sync()
            dt = time.perf_counter() - t0
            rows.append({"model": name, "sampler": sampler, "steps": n, "cfg_scale": 1.5, "batch": args.sample_batch,
                         "precision": "fp32", "seconds": round(dt, 2),
                         "images_per_s": round(args.sample_batch / dt, 3)})
        except Exception as e:
            errors.append({"section": f"sampling {sampler}", "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-2000:]})
            rows.append({"model": name, "sampler": sampler, "steps": n, "error": f"{type(e).__name__}: {e}"[:300]})


# ---------------------------------------------------------------------------------------------------------
#                                                 Report
# ---------------------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = [f"gpu_check {result['date']}  device: {result['device']}  torch {result['torch']}  "
             f"bf16 peak: {result['peak_bf16_flops']}", ""]
    t = result["tests"]
    lines.append(f"CUDA tests: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, {t.get('errors', '?')} "
                 f"errors, {t.get('skipped', '?')} skipped ({t.get('seconds', '?')} s)" if "error" not in t
                 else f"CUDA tests: {t['error']}")
    lines += [f"  FAILED {f}" for f in t.get("failed", [])]
    lines += ["", f"{'training step (bf16)':<28} {'mode':>8} {'img/s':>9} {'step ms':>9} {'peak GB':>8} "
              f"{'MFU':>6} {'compile s':>9} {'experts':>7}"]
    for r in result["train"]:
        mode = "compiled" if r.get("compiled") else "eager"
        if "step_ms" not in r:
            lines.append(f"{r['arm']:<28} {mode:>8}  {r.get('skipped') or r.get('error')}")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"{r['arm']:<28} {mode:>8} {r['images_per_s']:9.1f} {r['step_ms']:9.1f} "
                     f"{f(r['peak_mem_gb'], '8.2f'):>8} {f(r['mfu'], '6.1%'):>6} {f(r.get('compile_s'), '9.1f'):>9} "
                     f"{f(r['mean_active_experts'], '7.2f'):>7}")
    lines += ["", "ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items() if k != "goals"),
              "goals: " + ", ".join(f"{k}: {v}" for k, v in result["ratios"]["goals"].items()), ""]
    for r in result["sampling"]:
        lines.append(f"sampling {r['model']} {r['sampler']}-{r['steps']}: " +
                     (f"{r['images_per_s']} images/s ({r['seconds']} s for {r['batch']}, cfg {r['cfg_scale']}, "
                      f"{r['precision']})" if "images_per_s" in r else str(r.get("skipped") or r.get("error"))))
    lines += [""] + ep_lines(result["ep"]) + [""]
    for e in result["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error']}")
    lines.append(f"total {result['seconds']} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="DiT-T models at 8x8 latents, short runs: proves the script")
    p.add_argument("--out", default="gpu_check.json", help="JSON result; the table goes next to it (.txt)")
    p.add_argument("--batch", type=int, help="training images per step (default 32; tiny 4)")
    p.add_argument("--steps", type=int, help="timed training steps per arm (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--sample-batch", type=int, help="images per sampling run (default 16; tiny 2)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--budget-s", type=float, default=400, help="start nothing new after this many seconds")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: tests,train,ep,sampling")
    p.add_argument("--ep-steps", type=int, default=10, help="timed steps per arm of the ep section (default 10)")
    p.add_argument("--ep-timeout-s", type=float, default=180, help="at most this long for the ep section's torchrun")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.sample_batch = args.sample_batch or (2 if args.tiny else 16)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --tiny to exercise the script", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    clock = Clock(device, args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": name,
              "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
              "peak_bf16_flops": peak_bf16(name) if device.type == "cuda" else None,
              "packages_missing": [m for m in ("diffusers", "torch_fidelity") if importlib.util.find_spec(m) is None],
              "args": vars(args), "tests": {}, "train": [], "ep": {}, "sampling": [],
              "errors": []}
    if "tests" in skip:
        result["tests"] = {"error": "skipped (--skip tests)"}
    else:
        try:
            result["tests"] = run_tests(timeout_s=max(60.0, min(240.0, clock.left() / 2)))
        except Exception as e:
            result["tests"] = {"error": f"{type(e).__name__}: {e}"}
            result["errors"].append({"section": "tests", "error": result["tests"]["error"]})
    if "train" not in skip:
        train_section(args, clock, result["train"], result["errors"])
    result["ratios"] = ratios(result["train"], args.tiny)
    if "ep" in skip:
        result["ep"] = {"skipped": "--skip ep"}
    else:
        try:
            result["ep"] = ep_section(args, clock)
        except Exception as e:
            result["ep"] = {"error": f"{type(e).__name__}: {e}"}
        if "error" in result["ep"]:
            result["errors"].append({"section": "ep", "error": result["ep"]["error"],
                                     "traceback": result["ep"].get("tail", "")[-2000:]})
    if "sampling" not in skip:
        sampling_section(args, clock, result["sampling"], result["errors"])
    result["seconds"] = round(time.perf_counter() - clock.start, 1)
    text = table(result)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as fh:
        fh.write(text + "\n")
    print(text)
    ep = result["ep"].get("summary") or {k: v for k, v in result["ep"].items() if k in ("skipped", "error")}
    print(json.dumps({**{k: result[k] for k in ("date", "device", "ratios")}, "ep": ep, "seconds": result["seconds"]}))
    failed = result["errors"] or result["tests"].get("failures") or result["tests"].get("errors") or \
        result["tests"].get("returncode") not in (0, 5, None)         # 5: pytest collected/ran nothing
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
