"""Training: Accelerate, EMA, checkpoints, exact resume, routing statistics, fault handling.

``train(cfg)`` runs one experiment described by an ``ExperimentConfig`` and returns its run folder::

    runs/<name>/
        run.lock             held for the life of a run: a second run in this folder is refused (rundir.py)
        config.yaml          the resolved configuration (rewritten at every start, so a resume records its overrides)
        log.txt              the log printed on the console (model summary first)
        metrics.jsonl        one JSON object per logging step (keys below); never repeats a step
        metrics-superseded.jsonl   records of a continuation that a resume replaced (see metrics.py)
        tensorboard/         Accelerate tracker output (or wandb, ``train.tracker``)
        checkpoints/step-XXXXXXX/   dit_moe.weights.checkpoint format + ``accelerate/`` (optimizer, scheduler, scaler,
                                    RNG states of every rank, EMA, train state) for exact resume
        checkpoints/corrupt-step-XXXXXXX/   a checkpoint found corrupt on resume, kept for inspection
        samples/             EMA sample grids (when ``dit_moe.sampling`` is available)
        replicas.json        multi-process runs: digests of the model, EMA and router buffers of every rank

The package, one job per file: ``setup`` (Accelerator, data stream, model, EMA, optimizer, schedule), ``rundir``
(run folder, its lock, the log file), ``resume`` (which checkpoint, compatibility, changed settings),
``checkpointing`` (validation, the save sequence, rotation, the sweep of temporaries), ``metrics`` (running
sums, their reduction and the finite check, metrics.jsonl, routing statistics), ``stop`` (signals and rank
agreement), ``fsdp`` (``train.strategy=fsdp``: FSDP2 sharding of model, optimizer and EMA), ``parallel``
(``train.expert_parallel``: experts split over ep groups, tokens sent by all-to-all), ``full_state`` (the checkpoints
of both: full states gathered into the ddp files) and ``loop`` (``train`` itself, one optimizer step, the loss, the
EMA grid).

One optimizer step consumes ``train.global_batch_size`` examples: ``num_processes x grad_accum`` micro-batches of
``global_batch_size / (num_processes * grad_accum)``. An epoch is ``len(dataset) // global_batch_size`` steps; the
remainder of the shuffled order is dropped, so every epoch holds a whole number of steps.

Exact resume. The data order is a permutation drawn from (seed, epoch) only, and each example's augmentation
randomness (random flip, posterior sample) is drawn under a torch seed derived from (seed, epoch, index) rather
than from the global RNG, so it does not depend on the number of workers, Accelerate's one-batch look-ahead, or
where the run was interrupted. ``accelerator.save_state`` stores the model, optimizer, LR schedule, grad scaler
and every rank's RNG states; the EMA model and a small ``TrainState`` (step, epoch, position) are registered
with ``register_for_checkpointing``. A resume rebuilds everything, loads that state and skips the consumed
micro-batches of the current epoch with ``accelerator.skip_first_batches``. On CPU, 2N steps in one go and
N + resume + N give bit-identical parameters, EMA and router state (tests/test_training.py). A resume honours
changed optimisation settings (a new train.lr takes effect) and warns when the schedule changes (resume.py).

Faults.
* Bad input: the whole config is validated first (``dit_moe.validation.validate``), then the data against the model;
  a problem raises before the run folder is created.
* Non-finite loss: the per-step losses are summed on the device (no host sync per step); the sum is all-reduced
  and checked on every logging step and before every checkpoint. A NaN/inf anywhere since the last check
  raises ``TrainingDivergedError`` naming the step interval and the last good checkpoint; nothing is saved
  after the fault, so that checkpoint stays intact. NaN/inf in the input batches raises ``DataError`` instead
  (naming the data source and, for latent shards, the files). Cost of the choice: up to ``log_every`` steps run
  on after the fault before it is noticed (they are never saved).
* Kill during a checkpoint write or rotation: at every instant at least one complete checkpoint is visible to
  ``--resume latest``; the next run sweeps the temporaries and recovers a complete checkpoint left aside
  (checkpointing.py). A corrupt newest checkpoint is set aside and the previous one used (resume.py). A failed
  write (disk full) raises ``CheckpointError``; the previous checkpoint is intact.
* SIGTERM / Ctrl-C: the signal only sets a flag; the current step finishes, a checkpoint is written (or the one
  just written at this step is reused) and ``TrainingInterrupted`` is raised (``train.py`` exits with
  128 + signal number). A second Ctrl-C exits at once. With several processes the flag is all-reduced every
  step, so all ranks stop at the same step even when only one of them received the signal.

metrics.jsonl keys (one object per logging step; all numbers are averages over the steps since the previous
record and over all ranks unless noted):

    step              optimizer steps done
    epoch             current epoch (float: step / steps_per_epoch)
    lr                learning rate of the last step
    loss              total loss (diffusion loss + router aux losses), all-reduced mean
    mse, vb           the objective's logged terms: ddpm: epsilon-MSE and variational bound; flow: mse (velocity)
    aux_loss          sum of router aux losses (MoE models; 0 for dense)
    aux/<name>        each named aux term (e.g. aux/lb, aux/entropy), summed over layers
    grad_norm         gradient norm before clipping, last step (when train.grad_clip is set)
    steps_per_sec, images_per_sec, seconds   throughput over the interval and wall time since start
    Routing (MoE models; the names, definitions and reductions over layers are routing_tap.METRICS, listed in
    docs/routing-metrics.md; values of the last step):
    active_experts, active_experts_per_layer   mean routed experts per token (over layers; per layer)
    active_experts_std   Top-p / DTop-p / expert choice: its spread over tokens (mean over layers)
    target_experts    the DTop-p controller's target; Top-k: K; expert choice: K x capacity_factor
    threshold, controller_integral, controller_error, threshold_saturated, saturated_steps   DTop-p controller
    expert_load       fraction of routed (token, expert) pairs per expert, per layer (list of lists)
    load_max          max over layers and experts of load x num_experts (1 = perfectly balanced)
    router_entropy    mean router entropy per token (nats)
    cap_frac          Top-p / DTop-p: fraction of tokens that hit routing.k_max
    unrouted_frac     expert choice: fraction of tokens no expert took (zero routed output)
    drn_scale         DTop-p: mean dynamic routing normalization scale
    balance_bias      routing.balance_bias: the per-expert selection bias, per layer (list of lists)
    logit_std         mean over tokens of the router logits' spread, per layer (DTop-p divides by it)
    num_processes     world size (constant; recorded for the reader)

TensorBoard receives the scalar entries (lists are logged element-wise as ``key/i``).
"""
from ..errors import RunLockedError, TrainingDivergedError, TrainingError, TrainingInterrupted
from .checkpointing import ACCELERATE_DIR, validate_checkpoint
from .loop import build_objective, diffusion_loss, train, write_ema_grid
from .metrics import routing_metrics
from .rundir import LOCK_FILE, RunLock, default_run_name, run_dir_of
from .setup import EpochSampler, SeededItems, TrainState, ema_decay_at, lr_factor, update_ema
from .stop import StopSignals

__all__ = [
    "ACCELERATE_DIR", "EpochSampler", "LOCK_FILE", "RunLock", "RunLockedError", "SeededItems", "StopSignals",
    "TrainState", "TrainingDivergedError", "TrainingError", "TrainingInterrupted", "build_objective",
    "default_run_name", "diffusion_loss", "ema_decay_at", "lr_factor", "routing_metrics", "run_dir_of",
    "train", "update_ema", "validate_checkpoint", "write_ema_grid",
]
