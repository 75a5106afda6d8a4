"""Checkpoints in and out of dit-moe: formats, conversion, export, the Hub folder and the diffusers pipeline."""
