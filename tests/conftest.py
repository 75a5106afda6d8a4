import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread per process: tests are tiny (threads only add overhead), CPU results stay reproducible, and
# the multi-process tests do not oversubscribe the cores (OpenMP spin-waiting made a busy 2-core machine ~50x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


# Modules whose tests take tens of seconds each (pytest --durations, 2026-12-07). Under xdist each is one group, and
# xdist starts the groups with the most tests first: these begin early, and the short tests fill the other worker
# around them instead of a long test running alone at the end.
LONG_MODULES = {"test_compile.py", "test_gpu_check.py", "test_install.py", "test_study.py", "test_study_v2.py",
                "test_training.py"}


@pytest.hookimpl(tryfirst=True)    # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Scheduling under pytest-xdist (`make test`: -n 2 --dist loadgroup); without xdist the marks change nothing.

    * Tests marked ``multiprocess`` start two or more processes (torchrun, gloo groups, `study --jobs 2`). They all go
      to one xdist group, so one worker runs them one after another: two launches never race for the same two
      cores (a rank starved while its peer waits in a collective only makes the test slow or time out), and each
      launch's processes meet at most one other test process on the machine.
    * A module whose module-scoped fixture is expensive is a group of its own (``pytestmark`` in the module): xdist
      would otherwise split its tests over both workers and each worker would build the fixture again.
    * The other tests of LONG_MODULES: one group per module (above).
    """
    for item in items:
        if item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
        elif item.path.name in LONG_MODULES and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.hookimpl(optionalhook=True)    # a pytest-xdist hook, called on the controller with each worker's test ids
def pytest_xdist_node_collection_finished(node, ids):
    """Refuse to run when xdist's groups are silently ignored (pytest 9.2 with pytest-xdist 3.8: no id carries its
    "@group"): module fixtures would be built once per worker and two multi-process launches would race."""
    grouped = [i for i in ids if i.split("::")[0].rsplit("/", 1)[-1] in LONG_MODULES]    # each one group (above)
    if node.config.getvalue("dist") == "loadgroup" and grouped and not any("@" in i for i in grouped):
        raise pytest.UsageError(f"pytest {pytest.__version__} does not apply pytest-xdist's xdist_group (no test id "
                                "ends in @group); install the [dev] extra's pytest: pip install -e '.[dev]'")


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """test_train_fsdp's experiment under train.strategy=ddp on two torchrun ranks, launched once per test run: the
    run folder (6 steps, checkpoints at 3 and 6). test_train_distributed checks its replicas and files;
    test_train_fsdp compares the FSDP run with it and resumes it under fsdp. Tests only read it."""
    from test_train_fsdp import launch

    return launch(tmp_path_factory.mktemp("ddp"), "ddp", "ddp")
