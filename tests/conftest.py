import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread per process: tests are tiny (threads only add overhead), CPU results stay reproducible, and
# the multi-process tests do not oversubscribe the cores (OpenMP spin-waiting made a busy 2-core machine ~50x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
