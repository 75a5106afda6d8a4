"""Stop signals and rank agreement: every rank stops at the same step, and no rank waits forever on a failed peer.

A decision that one process makes (the main process takes the lock, picks the checkpoint, writes it; one rank
receives SIGTERM; one rank's disk write fails) is shared with every rank by one collective, so all of them raise
the same error or stop at the same step instead of hanging in the next barrier.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Optional, TypeVar

import torch
from accelerate.utils import broadcast_object_list

from ..errors import DitMoeError, TrainingError

logger = logging.getLogger("dit_moe.train")
T = TypeVar("T")


class StopSignals:
    """Context manager: SIGTERM and the first SIGINT set ``signum``; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping"
                       + (" (Ctrl-C again to exit without saving)" if signum == signal.SIGINT else ""))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def agreed_signal(stop: StopSignals, accelerator) -> int:
    """The stop signal any rank received (0: none); one all-reduce per step with several processes."""
    if accelerator.num_processes == 1:
        return stop.signum or 0
    flag = torch.tensor([float(stop.signum or 0)], device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item() > 0)


def on_main(accelerator, fn: Callable[..., T], *args) -> T:
    """Run ``fn(*args)`` on the main process only; every rank returns its result or raises its error.

    A user error (``DitMoeError``) is raised with the same class and message on every rank; any other failure
    keeps its traceback on the main process and reaches the other ranks as a ``TrainingError`` naming it.
    """
    if accelerator.num_processes == 1:
        return fn(*args)

    payload = [None, None, None]        # result, error class, message
    failure = None
    if accelerator.is_main_process:
        try:
            payload[0] = fn(*args)
        except DitMoeError as e:
            payload[1:] = [type(e), str(e)]
        except BaseException as e:
            failure = e
            payload[1:] = [TrainingError, f"the main process failed: {type(e).__name__}: {e}"]
    result, cls, message = broadcast_object_list(payload)
    if failure is not None:
        raise failure
    if cls is not None:
        raise cls(message)
    return result
