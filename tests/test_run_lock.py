"""The run-folder lock: a second run is refused with the holder named, stale locks of dead processes do not block,
and with several processes only the main one takes it (no rank hangs when it is refused)."""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dit_moe.config import load_config, save_config
from dit_moe.errors import RunLockedError, TrainingError
from dit_moe.training import LOCK_FILE, RunLock, train
from dit_moe.training.checkpointing import is_intact
from dit_moe.weights.checkpoint import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
           HF_HUB_OFFLINE="1")


def tiny(tmp_path, name="run", *overrides):
    return load_config(None, [
        "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        "routing.type=dtopp", "routing.target=2", f"train.run_dir={tmp_path}", f"train.run_name={name}",
        "train.tracker=null", "train.global_batch_size=32", "train.log_every=2", "train.ckpt_every=2",
        "train.steps=6", "train.keep_last=2", "sample.steps=2", "sample.num_per_class=1", *overrides])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {**RunLock(run_dir).info, "token": "0123456789ab", **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------------------
#                                              The lock itself
# ---------------------------------------------------------------------------------------------------------

def test_live_holder_is_named(tmp_path):
    held = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=rf"in use by PID {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("how", ["dead pid", "reused pid"])
def test_stale_lock_does_not_block(tmp_path, how):
    if how == "dead pid":
        write_lock(tmp_path, pid=dead_pid())
    else:   # our own PID, but another process start time: the holder died and the PID was reused
        info = RunLock(tmp_path).info
        if info["start_ticks"] is None:
            pytest.skip("no /proc start times here")
        write_lock(tmp_path, start_ticks=info["start_ticks"] - 1)
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    assert any("removed the stale lock" in n for n in lock.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]     # no temporary left
    lock.release()


def test_lock_of_another_machine_names_the_file_to_delete(tmp_path):
    write_lock(tmp_path, host="gpu-node-7", pid=dead_pid())
    with pytest.raises(RunLockedError, match=rf"PID \d+ on host gpu-node-7.*another machine.*delete .*{LOCK_FILE}"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text("garbage")
    with pytest.raises(RunLockedError, match="unreadable"):
        RunLock(tmp_path).acquire()


def test_a_lost_lock_is_noticed_and_not_released(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.verify()
    write_lock(tmp_path, pid=4242, token="someone-else")
    with pytest.raises(TrainingError, match="lost the lock.*PID 4242"):
        lock.verify()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "someone-else"


# ---------------------------------------------------------------------------------------------------------
#                                    Two trainings in one run folder
# ---------------------------------------------------------------------------------------------------------

def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_in_the_same_folder_is_refused_and_the_first_is_unharmed(tmp_path, capsys):
    """Run A (a process) pauses in step 3; run B (train.py, here) is refused naming A; A then finishes intact."""
    import train as cli

    cfg = tiny(tmp_path)
    save_config(cfg, tmp_path / "run.yaml")
    script = tmp_path / "a.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from dit_moe.config import load_config
        from dit_moe.diffusion import GaussianDiffusion
        from dit_moe.training import train
        original, calls = GaussianDiffusion.training_losses, [0]
        def paused(self, *a, **kw):
            calls[0] += 1
            if calls[0] == 3:                         # in step 3: tell the test, wait for run B to be refused
                Path({str(tmp_path / "a_running")!r}).write_text(str(os.getpid()))
                for _ in range(6000):
                    if Path({str(tmp_path / "b_done")!r}).exists():
                        break
                    time.sleep(0.1)
            return original(self, *a, **kw)
        GaussianDiffusion.training_losses = paused
        train(load_config(sys.argv[1]))
    """))
    a = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run.yaml")], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "a_running").exists():
            assert a.poll() is None, a.stderr.read()[-3000:]
            time.sleep(0.1)
        run = tmp_path / "run"
        before = snapshot(run)
        capsys.readouterr()
        assert cli.main(["--config", str(tmp_path / "run.yaml")]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("train.py: error: run folder") and f"in use by PID {a.pid} on host" in err[0]
        assert snapshot(run) == before, "the refused run touched the folder"
    finally:
        (tmp_path / "b_done").write_text("")
        a.wait(timeout=600)
    assert a.returncode == 0, a.stderr.read()[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert [p.name for p in list_checkpoints(run)] == ["step-0000004", "step-0000006"]
    assert all(is_intact(p) for p in list_checkpoints(run)) and not (run / LOCK_FILE).exists()


def test_refused_run_via_train_py_process(tmp_path):
    """The command line: exit 2, one line naming the holder; the holder's checkpoints untouched."""
    cfg = tiny(tmp_path, "run", "train.steps=2")
    run = train(cfg)
    held = RunLock(run).acquire()                          # a live holder: this test process
    save_config(cfg, tmp_path / "run.yaml")
    before = snapshot(run)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", str(tmp_path / "run.yaml"),
                           "--resume", "latest"], env=ENV, capture_output=True, text=True, timeout=600)
    after = snapshot(run)
    held.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by PID {os.getpid()}" in lines[0], proc.stderr
    assert after == before


@pytest.mark.multiprocess
def test_two_processes_refused_together(tmp_path):
    """torchrun with 2 ranks on a locked folder: the main rank is refused and the other rank learns it (no hang)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = RunLock(run_dir).acquire()                      # a live holder: this test process
    save_config(tiny(tmp_path), tmp_path / "run.yaml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), os.path.join(REPO, "train.py"),
                           "--config", str(tmp_path / "run.yaml")], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=600)
    held.release()
    # Both ranks write to the same pipe: two lines written at the same instant can interleave, so count the
    # messages in the whole text rather than line by line.
    assert proc.stderr.count("train.py: error: run folder") == 2, proc.stderr[-4000:]
    assert re.findall(r"in use by PID (\d+)", proc.stderr) == [str(os.getpid())] * 2, proc.stderr[-4000:]
    assert proc.returncode != 0
    assert list(run_dir.iterdir()) == []                  # nothing was created beside the (released) lock
