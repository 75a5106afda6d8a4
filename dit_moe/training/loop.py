"""The training loop: ``train(cfg)``, one optimizer step, the diffusion loss, the EMA sample grid."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, save_config
from ..diffusion import build_objective
from ..errors import TrainingInterrupted
from ..sampling.grid import training_grid
from ..validation import validate
from .checkpointing import Checkpointer
from .metrics import Logbook, RunningMeans, check_replicas, trim_metrics
from .resume import check_init_from, choose_checkpoint, restore, resume_request
from .rundir import RunFolder
from .setup import (Parts, build_parts, describe_run, ema_decay_at, flat_config, make_accelerator, micro_batches,
                    open_data, process_count, update_ema)
from .stop import StopSignals, agreed_signal, on_main

logger = logging.getLogger("dit_moe.train")


def train(cfg: ExperimentConfig, resume: Optional[str] = None) -> Path:
    """Train the experiment ``cfg``; returns the run folder.

    resume: None (fresh run; refuses a run folder that already holds checkpoints), ``"latest"`` (continue from
    the newest intact checkpoint of the run folder, or start fresh if there is none -- handy for requeued jobs),
    or the path of a checkpoint or run folder (training continues in that checkpoint's run folder).
    Raises ConfigError for bad settings (before anything is written), RunLockedError when another process
    trains in the run folder, CheckpointError for an unusable checkpoint or a failed write, DataError for bad
    data, TrainingDivergedError on a non-finite loss, TrainingInterrupted after SIGTERM/SIGINT (a checkpoint
    has been written).
    """
    t = cfg.train
    validate(cfg, num_processes=process_count())                 # every config problem at once, nothing written
    request = resume_request(cfg, resume)
    accelerator = make_accelerator(cfg, request.run_dir)
    data = open_data(cfg, accelerator)                           # the data fits the model: still nothing written
    check_init_from(cfg, request)
    with RunFolder(request.run_dir, accelerator) as run:         # created, locked, logging to log.txt
        resume_from = on_main(accelerator, choose_checkpoint, request)
        parts = build_parts(cfg, data, accelerator, init_from=t.init_from if resume_from is None else None)
        state = parts.state
        if resume_from is not None:
            restore(cfg, parts, data, accelerator, resume_from)
        else:
            logger.info("starting a new run" + (" (--resume latest: no checkpoint yet)" if resume else ""))
        if accelerator.is_main_process:
            trim_metrics(run.dir, state.step)
            save_config(cfg, run.dir / "config.yaml")
        objective = build_objective(cfg, learn_sigma=cfg.model.learn_sigma)
        for line in describe_run(cfg, parts, data, accelerator, run.dir) + [objective.describe()]:
            logger.info(line)
        if t.tracker is not None:
            accelerator.init_trackers(t.tracker, config=flat_config(cfg))

        batches = micro_batches(data, state, accelerator, t.grad_accum)
        ckpts = Checkpointer(run, cfg, parts, data, accelerator, last=resume_from)
        meter = RunningMeans(accelerator, run.dir, data, ckpts, start_step=state.step)
        progress = tqdm(total=t.steps, initial=state.step, desc=run.dir.name, disable=not accelerator.is_main_process,
                        dynamic_ncols=True, mininterval=2.0)
        logbook = Logbook(run.dir, cfg, accelerator, data.steps_per_epoch, state.step, progress)
        grad_norm = None
        run.keep()
        try:
            with StopSignals() as stop:
                while state.step < t.steps:
                    # ----- one optimizer step over grad_accum micro-batches, then schedule, router state, EMA
                    grad_norm = train_step(parts, objective, batches, meter, accelerator, t.grad_accum, t.grad_clip,
                                           grad_norm)
                    lr = parts.scheduler.get_last_lr()[0]     # the rate this step used (python float: no sync)
                    parts.scheduler.step()
                    if parts.moe is not None:
                        parts.moe.routing_step(parts.raw_model, parts.all_reduce)
                    state.advance()
                    update_ema(parts.ema, parts.raw_model, ema_decay_at(state.step, t.ema_decay, t.ema_warmup))
                    meter.steps += 1
                    progress.update(1)

                    # ----- log (the only host sync of a normal step), checkpoint, samples
                    if state.step % t.log_every == 0 or state.step == t.steps:
                        logbook.write(state.step, meter.take(state.step), lr, grad_norm, parts.raw_model)
                    if state.step % t.ckpt_every == 0 and state.step < t.steps:
                        meter.check(state.step)                  # nothing is saved after a fault
                        ckpts.save("periodic")
                    if t.sample_every and state.step % t.sample_every == 0 and state.step < t.steps:
                        write_ema_grid(cfg, parts, data.info, run.dir, accelerator)

                    # ----- stop requests: all ranks agree on the step they stop at
                    signum = agreed_signal(stop, accelerator)
                    if signum and state.step < t.steps:
                        name = signal.Signals(signum).name
                        meter.check(state.step)
                        path = ckpts.save_once(f"stopped by {name}")
                        raise TrainingInterrupted(f"stopped by {name} at step {state.step}/{t.steps}; checkpoint "
                                                  f"{path}; continue with --resume latest", signum, state.step, path)

                # ----- the end
                meter.check(state.step)
                ckpts.save_once("final")
                write_ema_grid(cfg, parts, data.info, run.dir, accelerator)
                check_replicas(accelerator, parts, run.dir)
                logger.info(f"done: {state.step} steps in {time.perf_counter() - logbook.t_start:.1f} s; "
                            f"run folder {run.dir}")
        finally:
            progress.close()
            accelerator.end_training()
    return run.dir


# ---------------------------------------------------------------------------------------------------------
#                                     One optimizer step and its loss
# ---------------------------------------------------------------------------------------------------------

def diffusion_loss(objective, model, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch x (N, C, H, W), y (N,): each (N,); "loss" is optimised, the rest logged.

    The one place the objective is called; it draws the timesteps and the noise itself (dit_moe.diffusion).
    """
    return objective.training_losses(lambda xt, tt: model(xt, tt, y), x)


def train_step(parts: Parts, objective, batches: Iterator, meter: RunningMeans, accelerator, grad_accum: int,
               grad_clip: Optional[float], grad_norm):
    """grad_accum micro-batches and one optimizer step; returns the gradient norm (a device tensor) or None."""
    model = parts.model
    try:
        for _ in range(grad_accum):
            x, y = next(batches)
            meter.add_inputs(x)
            with accelerator.accumulate(model):
                terms = diffusion_loss(objective, model, x, y)
                loss = terms["loss"].mean()
                if parts.moe is not None:
                    aux, aux_terms = parts.moe.collect_aux_loss(parts.raw_model)
                    loss = loss + aux
                    meter.add("aux_loss", aux / grad_accum)
                    for k, v in aux_terms.items():
                        meter.add(f"aux/{k}", v / grad_accum)
                accelerator.backward(loss)
                if accelerator.sync_gradients and parts.sharding is not None:
                    parts.sharding.reduce_gradients()     # ep: the expert shards' gradients over dp
                if accelerator.sync_gradients and grad_clip is not None:
                    clip = accelerator if parts.sharding is None else parts.sharding   # fsdp, ep: split gradients
                    grad_norm = clip.clip_grad_norm_(model.parameters(), grad_clip)
                parts.optimizer.step()
                parts.optimizer.zero_grad(set_to_none=True)
            meter.add("loss", loss / grad_accum)
            for k, v in terms.items():
                if k != "loss":
                    meter.add(k, v.mean() / grad_accum)
    except Exception:
        # NaN weights usually crash a router (no expert passes the threshold) before the next logging step;
        # report the divergence (or the bad data), not the symptom.
        meter.check_local(parts.state.step + 1)
        raise
    return grad_norm


# ---------------------------------------------------------------------------------------------------------
#                                            EMA sample grid
# ---------------------------------------------------------------------------------------------------------

def write_ema_grid(cfg: ExperimentConfig, parts: Parts, info, run_dir: Path, accelerator) -> None:
    """EMA samples of up to 10 classes -> samples/step-XXXXXXX.png (main process), RNG-isolated.

    The one place training draws samples; dit_moe.sampling.training_grid goes through the inference path.
    """
    ema = parts.ema if parts.sharding is None else parts.sharding.plain_ema(parts, cfg)   # fsdp, ep: gathered
    if accelerator.is_main_process:
        r = training_grid(ema, cfg, info, accelerator.device,
                          run_dir / "samples" / f"step-{parts.state.step:07d}.png")
        s = r["settings"]
        logger.info(f"EMA samples ({s.sampler}, {s.steps} steps, cfg {s.cfg_scale}): {r['path']} "
                    f"({r['seconds']:.1f} s)")
    accelerator.wait_for_everyone()
