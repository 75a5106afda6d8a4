"""A checkpoint as a Hugging Face Hub model folder: export, model card, push, and Hub ids as checkpoints.

    dit-moe convert runs/moe/checkpoints/step-0400000 --to hub --out hub/my-moe [--weights ema|raw]
    dit-moe convert runs/moe --to hub --out hub/my-moe --push-to-hub me/dit-moe-xl-e16     # online, logged in

The folder holds exactly three files, uploadable as it is:

    config.json          the checkpoint description (dit_moe.weights.checkpoint format): architecture and routing, the
                         experiment (objective in ``diffusion``, sampling defaults in ``sample``, data, training),
                         data_info with the decoder reference (``vae``, scaling factor) and the class names,
                         meta.hub_export (source checkpoint, which weights, the run records used)
    model.safetensors    one set of weights (EMA by default, ``--weights raw`` for the trained ones), fingerprinted
    README.md            the model card: Hub metadata block; what the model is; activated vs total parameters
                         and GMACs; routing and the activated experts measured in training (the run's
                         metrics.jsonl at the checkpoint's step); data, steps, batch; the metrics the run recorded
                         (metrics.json files of bulk sampling / evaluate) with their settings; commands to sample
                         and score it, and to load it in diffusers

No optimizer, scheduler, RNG or Accelerate state goes in. Since the folder is a dit-moe checkpoint, every command
that takes a checkpoint takes it; ``resolve_checkpoint`` also takes a Hub id (``owner/name``) whose snapshot is
in the Hugging Face cache (``hub_snapshot``: ``snapshot_download``, local files only when HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from huggingface_hub import HfApi, ModelCardData, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from ..errors import DitMoeError
from ..registry import count_params, parse_name
from .build import build_from_checkpoint
from .checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, is_checkpoint, run_dir_of_checkpoint, save_checkpoint
from .outputs import one_line, prepare_output

__all__ = ["HubError", "HUB_FILES", "CARD_FILE", "export_hub", "model_card", "training_routing_record",
           "recorded_metrics", "hub_snapshot", "check_push", "push_folder"]

CARD_FILE = "README.md"
HUB_FILES = (CONFIG_FILE, MODEL_FILE, CARD_FILE)
WEIGHTS = ("ema", "raw")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(DitMoeError, ValueError):
    """A Hub export or upload that cannot be done (offline, not logged in, a bad repo id); names the value."""


# ---------------------------------------------------------------------------------------------------------
#                                     Hub ids as checkpoints (reading)
# ---------------------------------------------------------------------------------------------------------

def hub_snapshot(name: str) -> tuple[Optional[Path], str]:
    """(the local snapshot of Hub model ``name`` when it is a dit-moe checkpoint, why not otherwise).

    ``name`` that is not shaped like a Hub id gives (None, ""). Offline (HF_HUB_OFFLINE=1) only the cache is
    looked at; online the files are downloaded (only the three of a Hub folder)."""
    if not _HUB_ID.match(name):
        return None, ""
    try:
        folder = Path(snapshot_download(name, allow_patterns=list(HUB_FILES),
                                        local_files_only=bool(constants.HF_HUB_OFFLINE)))
    except LocalEntryNotFoundError:
        return None, (f", nor a Hugging Face Hub model in the cache {constants.HF_HUB_CACHE}"
                      f"{' (HF_HUB_OFFLINE=1)' if constants.HF_HUB_OFFLINE else ''}")
    except (HfHubHTTPError, OSError, ValueError) as e:
        return None, f", nor a Hugging Face Hub model ({one_line(e)})"
    if not is_checkpoint(folder):
        return None, f", and the Hub model {name} is not a dit-moe checkpoint (no {CONFIG_FILE} + {MODEL_FILE})"
    return folder, ""


# ---------------------------------------------------------------------------------------------------------
#                                          The run's records
# ---------------------------------------------------------------------------------------------------------

def training_routing_record(run_dir: Optional[Path], step: int) -> Optional[dict]:
    """The routing entries of the run's metrics.jsonl record closest before (or at) ``step``: activated experts
    (mean, spread, per layer), their target, load balance. None without a run folder or routing records."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    best = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:      # a line cut short by a crash: not a record
            continue
        if isinstance(rec, dict) and "active_experts" in rec and rec.get("step", 0) <= step:
            if best is None or rec["step"] >= best["step"]:
                best = rec
    if best is None:
        return None
    keys = ("step", "active_experts", "active_experts_std", "active_experts_per_layer", "target_experts",
            "load_max", "router_entropy", "threshold")
    return {k: best[k] for k in keys if k in best}


def recorded_metrics(run_dir: Optional[Path], step: int, extra: Sequence[str | os.PathLike] = ()) -> list[dict]:
    """The metrics recorded for this checkpoint: every ``metrics.json`` under the run folder whose settings name
    this step (bulk sampling with ``--fid`` writes one), and the files in ``extra`` (``evaluate --out`` files), as
    [{"file", "metrics", "settings"}]. A file in ``extra`` that is not a metrics JSON is an error."""
    found = []
    candidates = sorted(run_dir.rglob("metrics.json")) if run_dir is not None else []
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue                      # not ours: the run folder may hold other JSON named so
        if isinstance(data, dict) and data.get("settings", {}).get("checkpoint_step") == step:
            found.append({"file": str(path), **{k: data[k] for k in ("metrics", "settings")}})
    for path in extra:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise HubError(f"--metrics-json {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HubError(f"--metrics-json {path} is not valid JSON ({e})") from None
        if not (isinstance(data, dict) and isinstance(data.get("metrics"), dict)):
            raise HubError(f"--metrics-json {path} is not a metrics file (no \"metrics\" object; dit-moe evaluate "
                           "--out writes one)")
        found.append({"file": str(path), "metrics": data["metrics"], "settings": data.get("settings", {})})
    return found


# ---------------------------------------------------------------------------------------------------------
#                                             The model card
# ---------------------------------------------------------------------------------------------------------

_METRIC_SETTINGS = ("reference", "num_generated", "num_reference", "sampler", "steps", "cfg_scale",
                    "guidance_channels", "guidance_interval", "weights", "feature_extractor", "checkpoint_step",
                    "active_experts_mean")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return str(v)


def model_card(ckpt, weights: str, repo_id: Optional[str], routing_record: Optional[dict],
               metrics: list[dict]) -> str:
    """README.md of a Hub folder for checkpoint ``ckpt`` (dit_moe.weights.checkpoint.Checkpoint)."""
    cfg, routing, exp = ckpt.model_config, ckpt.routing_config, ckpt.experiment
    arch = parse_name(cfg.name)
    info = ckpt.data_info or {}
    counts = count_params(cfg, routing)
    objective = exp.diffusion.objective if exp is not None else "ddpm"
    where = repo_id or "OWNER/NAME"           # the Hub id once uploaded; a local copy of the folder works too
    tags = ["dit-moe", "diffusion", "diffusion-transformer", "class-conditional", "image-generation", objective]
    if arch.is_moe:
        tags.insert(3, "mixture-of-experts")
    data = ModelCardData(library_name="dit-moe", tags=tags)
    lines = ["---", data.to_yaml(), "---", ""]
    kind = f"{arch.num_experts}-expert MoE DiT ({routing.type} routing)" if arch.is_moe else "dense DiT"
    lines += [f"# {cfg.name}" + (f" ({routing.type})" if arch.is_moe else ""), "",
              f"A class-conditional {kind} trained with dit-moe, {objective} objective, "
              f"{info.get('num_classes', cfg.num_classes)} classes at {info.get('image_size', cfg.input_size)} px "
              f"({cfg.in_channels} x {cfg.input_size} x {cfg.input_size} "
              f"{'latents' if info.get('vae') else 'pixels'}). Weights: {weights} at step {ckpt.step}.", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | {cfg.name}: depth {arch.depth}, hidden {arch.hidden_size}, heads {arch.num_heads}, "
              f"patch {arch.patch_size} |"]
    if arch.is_moe:
        lines.append(f"| experts | {arch.num_experts} {cfg.expert_kind} experts, top-{arch.top_k} by name, MoE every "
                     f"{cfg.moe_every} block(s), {cfg.num_shared_experts} shared |")
    lines += [f"| parameters | {counts['total_params'] / 1e6:.2f} M total, {counts['active_params'] / 1e6:.2f} M "
              f"activated per token ({arch.top_k if arch.is_moe else 1} expert(s) per MoE layer) |",
              f"| compute | {counts['gflops']:.3f} GMACs per image (forward, {arch.top_k if arch.is_moe else 1} "
              f"expert(s) per token) |",
              f"| learned sigma | {cfg.learn_sigma} |",
              f"| decoder | {info.get('vae') or 'none (pixel space)'}; latents x / {info.get('scaling_factor', 1.0)} "
              f"+ {info.get('shift_factor', 0.0)} |", ""]
    if arch.is_moe:
        lines += ["## Routing", "", f"Router: `{routing.type}`. Settings: "
                  + ", ".join(f"{k}={v}" for k, v in asdict(routing).items() if v is not None) + ".", ""]
        if routing_record:
            r = routing_record
            lines += [f"Activated experts measured in training (metrics.jsonl, step {r['step']}): "
                      f"{_fmt(r['active_experts'])} per token on average"
                      + (f" (spread {_fmt(r['active_experts_std'])})" if "active_experts_std" in r else "")
                      + (f", target {_fmt(r['target_experts'])}" if "target_experts" in r else "") + ".", ""]
            if "active_experts_per_layer" in r:
                lines += [f"Per MoE layer: {_fmt(r['active_experts_per_layer'])}.", ""]
        else:
            lines += ["Activated experts in training: not recorded (no run metrics.jsonl beside the checkpoint).", ""]
    lines += ["## Training", ""]
    if exp is not None:
        t, d = exp.train, exp.data
        lines += [f"- data: {d.source}" + (f" ({d.path})" if d.path else "") + f"; {info.get('source', '')}",
                  f"- steps: {ckpt.step} (of {t.steps} planned), global batch {t.global_batch_size}, lr {t.lr:g}, "
                  f"EMA decay {t.ema_decay:g}",
                  f"- objective: {objective}" + (f", time shift {exp.diffusion.time_shift:g}"
                                                 if objective == "flow" else ""), ""]
    else:
        lines += ["Not recorded (converted checkpoint).", ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metrics | settings | file |", "|---|---|---|"]
        for m in metrics:
            vals = ", ".join(f"{k} {_fmt(v)}" for k, v in m["metrics"].items())
            sets = ", ".join(f"{k}={_fmt(m['settings'][k])}" for k in _METRIC_SETTINGS if k in m["settings"])
            lines.append(f"| {vals} | {sets} | {Path(m['file']).name} |")
        lines.append("")
    else:
        lines += ["None recorded for this checkpoint.", ""]
    s = exp.sample if exp is not None else None
    sampler = f" --sampler {s.sampler}" if s is not None and s.sampler else ""
    lines += ["## Use", "", f"With dit-moe installed; `{where}` may also be a local copy of this folder.", "",
              "```bash",
              f"dit-moe sample {where} --classes 1 2 3 --out grid.png{sampler}",
              f"dit-moe sample {where} --num-samples 50000 --out samples/ --fid REFERENCE.npz "
              "--metrics fid,sfid,isc,kid,prc",
              "dit-moe evaluate samples/samples.npz REFERENCE.npz --metrics fid,sfid,isc,kid,prc --out metrics.json",
              "```", "", "In diffusers (a `DiffusionPipeline` around dit-moe's network):", "", "```python",
              "from dit_moe.weights.diffusers_moe import pipeline_from_checkpoint",
              f"pipe = pipeline_from_checkpoint({where!r})",
              "images = pipe(class_labels=[1, 2, 3], num_inference_steps=50).images", "```", "",
              f"or `dit-moe convert {where} --to diffusers --out pipe/` and `DiTMoEPipeline.from_pretrained('pipe/')`.",
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
#                                          Export and upload
# ---------------------------------------------------------------------------------------------------------

def _is_hub_folder(path: Path) -> bool:
    return is_checkpoint(path) and (path / CARD_FILE).is_file()


def check_push(repo_id: str) -> None:
    """Before any work: a Hub upload of ``repo_id`` can be tried (a valid id, not offline, a token)."""
    if not _HUB_ID.match(repo_id):
        raise HubError(f"--push-to-hub {repo_id!r} is not a Hub repo id (owner/name)")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push-to-hub {repo_id}: offline (HF_HUB_OFFLINE=1), nothing uploaded; unset it on a "
                       "machine with internet")
    if get_token() is None:
        raise HubError(f"--push-to-hub {repo_id}: not logged in to the Hugging Face Hub, nothing uploaded; run "
                       "`hf auth login` or set HF_TOKEN")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload the Hub folder to ``repo_id`` (created if needed); returns the commit URL."""
    check_push(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=list(HUB_FILES),
                                 commit_message=f"dit-moe export of {folder.name}")
    except (HfHubHTTPError, OSError, ValueError) as e:     # requests' connection errors are OSErrors
        raise HubError(f"--push-to-hub {repo_id}: upload failed ({one_line(e)})") from None
    return str(getattr(info, "commit_url", info))


def export_hub(checkpoint, out, *, weights: str = "ema", overwrite: bool = False,
               push_to_hub: Optional[str] = None, private: bool = False,
               metrics_json: Sequence[str | os.PathLike] = ()) -> Path:
    """Write the Hub folder of ``checkpoint`` (checkpoint or run folder) to ``out``; upload it with
    ``push_to_hub``. Refuses a non-empty ``out`` without ``overwrite`` (and any folder that is not a Hub folder)."""
    if weights not in WEIGHTS:
        raise HubError(f"--weights {weights!r} must be one of {WEIGHTS}")
    if push_to_hub is not None:
        check_push(push_to_hub)            # offline / not logged in: fail before writing anything
    out = prepare_output(out, overwrite, _is_hub_folder, "dit-moe Hub folder")
    model, ckpt = build_from_checkpoint(checkpoint, which="ema" if weights == "ema" else "model")
    used = weights if weights == "raw" or (ckpt.path / EMA_FILE).is_file() else "raw (no EMA saved)"
    run = run_dir_of_checkpoint(ckpt.path)
    record = training_routing_record(run, ckpt.step) if model.arch.is_moe else None
    metrics = recorded_metrics(run, ckpt.step, metrics_json)
    card = model_card(ckpt, used, push_to_hub, record, metrics)
    meta = {**ckpt.meta, "hub_export": {"source": str(ckpt.path.resolve()), "weights": used,
                                        "routing_record": record, "metrics_files": [m["file"] for m in metrics]}}
    save_checkpoint(out, model, None, step=ckpt.step, experiment=ckpt.experiment, data_info=ckpt.data_info,
                    meta=meta, write_extra=lambda tmp: (tmp / CARD_FILE).write_text(card))
    if push_to_hub is not None:
        print(f"uploaded {out} to {push_to_hub}: {push_folder(out, push_to_hub, private)}")
    return out
