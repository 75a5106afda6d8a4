"""`dit-moe`: the toolkit's one command (dit_moe/__main__.py makes `python -m dit_moe` the same).

Each command's arguments are defined once, by the module that does the job (its ``add_arguments(parser)``; a flag
that several commands take comes from one shared flag group: ``add_device_argument`` here, the sampler flags of
dit_moe/sampling/flags.py, the metric flags of dit_moe/evaluate/cli.py), and run by that module's ``run(args)``;
this file mounts them (``COMMANDS``) and turns a user error into one line (``dispatch``). A command module is
imported only when its command runs (``importlib.import_module`` in ``_mount`` and ``_run``: the one place where
imports wait, for start-up time), so ``dit-moe --help`` loads no torch and ``dit-moe analyze --run`` never does.
``train.py``, ``sample.py`` and ``python -m dit_moe.<module>`` enter through ``run_command``, the same path with the
command's own parser.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Optional, Sequence

from .errors import DitMoeError, TrainingInterrupted, cli_error

__all__ = ["COMMANDS", "Command", "build_parser", "main", "run_command", "dispatch", "add_device_argument"]


@dataclass(frozen=True)
class Command:
    module: str                 # defines the two functions below
    help: str                   # its line in `dit-moe --help`
    intermixed: bool = False    # options may come between positional section.key=value overrides
    add_arguments: str = "add_arguments"
    run: str = "run"            # run(args) -> an exit code, or a result (exit code 0)


DESCRIPTION = "Train, sample, evaluate and analyse class-conditional Mixture-of-Experts Diffusion Transformers."
EPILOG = """examples:
  dit-moe train --config configs/default.yaml train.lr=2e-4     # train; --resume latest continues a run
  dit-moe sample runs/default --out grid.png                    # a labelled grid from the latest checkpoint
  dit-moe sample runs/default --num-samples 1000 --out samples/ --fid ref.npz --extractor digits-cnn
  dit-moe analyze runs/default                                  # routing plots; --run DIR: training curves
  accelerate launch --num_processes 8 -m dit_moe train ...      # several processes / GPUs
  dit-moe COMMAND --help                                        # the options of one command

exit codes: 0 done; 2 a user error, as one line `dit-moe COMMAND: error: ...` naming the file, key or value (a bad
flag or config value, a missing or corrupt file, a locked run folder, a full disk); 128 + signal number after
SIGTERM/SIGINT during training (a checkpoint was written: continue with --resume latest); 130 Ctrl-C otherwise.
A traceback is a bug: please report it."""

COMMANDS = {
    "train": Command("dit_moe.training.cli", "train a (MoE) DiT from a YAML config (resumable)", True),
    "sample": Command("dit_moe.sampling.cli", "sample a checkpoint: a grid, or N images (+ FID)"),
    "evaluate": Command("dit_moe.evaluate.cli", "FID / IS / KID / precision-recall of two image sets"),
    "analyze": Command("dit_moe.analyze.cli", "routing plots of a checkpoint, training curves of a run"),
    "extract": Command("dit_moe.extract", "encode an image folder into VAE latent shards"),
    "study": Command("dit_moe.study.cli", "the routing study: arms x seeds, trained and compared"),
    "demo": Command("dit_moe.demo", "the whole pipeline on the embedded digits (make demo)", True),
    "models": Command("dit_moe.registry", "registry names with parameters and GFLOPs per image",
                      add_arguments="add_models_arguments", run="run_models"),
    "convert": Command("dit_moe.weights.convert", "import DiT / diffusers weights; export to diffusers"),
    "upcycle": Command("dit_moe.weights.upcycle", "turn a dense checkpoint into an MoE (experts = its MLP)", True),
}


def _mount(name: str, parser: argparse.ArgumentParser) -> None:
    command = COMMANDS[name]
    getattr(importlib.import_module(command.module), command.add_arguments)(parser)


class _Commands(argparse._SubParsersAction):
    """Subcommands whose arguments are added when the command is chosen (argparse's own subparsers add them all
    up front, which would import every command module, torch included, for `dit-moe --help`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, rest = values[0], values[1:]
        sub = self.choices[name]                       # argparse has checked the name against the choices
        _mount(name, sub)
        setattr(namespace, self.dest, name)
        parse = sub.parse_intermixed_args if COMMANDS[name].intermixed else sub.parse_args
        for key, value in vars(parse(rest)).items():
            setattr(namespace, key, value)


def _top_parser(prog: str = "dit-moe") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True,
                                     action=_Commands)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, description=command.help)
    return parser


def _version() -> str:
    try:
        return version("dit-moe")
    except PackageNotFoundError:
        return "(not installed: running from a source tree)"


def build_parser(name: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A stand-alone parser of one command (``train.py``, ``python -m dit_moe.<module>``)."""
    parser = argparse.ArgumentParser(prog=prog or f"dit-moe {name}", description=COMMANDS[name].help)
    _mount(name, parser)
    return parser


def dispatch(label: str, name: str, args: argparse.Namespace) -> int:
    """Run command ``name`` on parsed ``args`` (``_run``) and return its exit code.

    A process that sharded a model over several ranks (``train.strategy=fsdp`` under torchrun / accelerate) ends
    here, with ``os._exit`` after flushing, instead of returning: its process group outlives
    ``destroy_process_group`` (dit_moe/training/fsdp.py says why) and tearing it down with the interpreter can abort
    a rank after a finished run. Everything worth keeping is written and flushed by then.
    """
    code = _run(label, name, args)
    fsdp = sys.modules.get("dit_moe.training.fsdp")     # never imported -> nothing was sharded
    if fsdp is not None and fsdp.sharded_over_processes():
        end_process_now(code)
    return code


def end_process_now(code: int) -> None:
    """Flush the log handlers and the standard streams, then leave with ``code`` without interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):     # a closed or broken stream: nothing more can reach it
            pass
    os._exit(code)


def _run(label: str, name: str, args: argparse.Namespace) -> int:
    """Run command ``name`` on parsed ``args``; a user error becomes one line ``<label>: error: ...``, exit code 2.

    User errors are the toolkit's ``DitMoeError`` (every module raises it, or a subclass, for bad input) and
    ``OSError`` (a path that cannot be read or written, a full disk: the message names the file). Anything else is
    a bug and keeps its traceback.
    """
    command = COMMANDS[name]
    run = getattr(importlib.import_module(command.module), command.run)
    try:
        result = run(args)
    except TrainingInterrupted as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:             # `dit-moe models | head`: the reader left; not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (Python's own flush at exit would fail)
        return 128 + 13
    except (DitMoeError, OSError) as e:
        return cli_error(label, e)
    except KeyboardInterrupt as e:
        print(f"{label}: interrupted (Ctrl-C){f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_command(name: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
                label: Optional[str] = None) -> int:
    """Parse ``argv`` with command ``name``'s own parser and run it: the entry of ``train.py``, ``sample.py`` and
    ``python -m dit_moe.<module>``. ``label`` starts its error lines (default: ``prog``)."""
    parser = build_parser(name, prog)
    args = (parser.parse_intermixed_args if COMMANDS[name].intermixed else parser.parse_args)(argv)
    return dispatch(label or parser.prog, name, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dit-moe COMMAND ...``."""
    parser = _top_parser()
    args = parser.parse_args(argv)
    return dispatch(f"{parser.prog} {args.command}", args.command, args)


# ---------------------------------------------------------------------------------------------------------
#                        Shared flag groups: a flag several commands take is defined here once
# ---------------------------------------------------------------------------------------------------------
# (The sampler flags are sampling/flags.py's, the metric flags evaluate/cli.py's; each is defined once there.)

def add_device_argument(p: argparse.ArgumentParser) -> None:
    """--device of sample, analyze, demo, evaluate and study: any torch device this machine has, checked once by
    ``dit_moe.inference.resolve_device`` before any work (one line naming the value, exit code 2)."""
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1, ... (default: CUDA when available; under "
                                    "accelerate launch each process's own)")
