"""Parallelism beyond data parallelism: ``ep`` (expert parallelism: experts sharded over an ep process group,
routed tokens sent by all-to-all)."""
