"""Parallelism beyond data parallelism: expert parallelism (``train.expert_parallel``).

``ep``: a MoE layer's experts sharded over an ep process group and its routed tokens sent to them by all-to-all
(models only see the ``MoEMLP.dispatcher`` hook). ``ep_train``: the training plan around it (the dp x ep mesh, what
DDP and the expert gradient reduction cover, clipping, checkpoints in the ddp files)."""
