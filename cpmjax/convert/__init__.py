"""Checkpoint conversion between Hugging Face folders and cpmjax parameters."""

from cpmjax.convert.hf_export import save_hf
from cpmjax.convert.hf_import import CheckpointError, load_hf

__all__ = ["CheckpointError", "load_hf", "save_hf"]
