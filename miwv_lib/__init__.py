"""MIWV: importance-aware data selection for instruction tuning — the paper's method, step by step.

Everything the notebooks and the command line use is importable from here.
"""

__version__ = "0.1.0"

from .data import DataError, InstructionPool, load_instructions, load_test_set  # noqa: E402
from .models import DEFAULT_MODEL, LoadedModel, build_tiny_model, load_model  # noqa: E402
from .neighbors import embed_texts, load_embedder, nearest_neighbors  # noqa: E402
from .prompts import encode_examples, format_prompt  # noqa: E402
from .scoring import (  # noqa: E402
    ScoreConfig,
    ifd,
    miwv,
    one_shot_sequence,
    response_loss,
    score_pool,
    sequence_losses,
    unconditional_sequence,
    zero_shot_sequence,
)
from .selection import export_subset, select_indices, subset_size  # noqa: E402

__all__ = [
    "DEFAULT_MODEL", "DataError", "InstructionPool", "LoadedModel", "ScoreConfig", "build_tiny_model",
    "embed_texts", "encode_examples", "export_subset", "format_prompt", "ifd", "load_embedder",
    "load_instructions", "load_model", "load_test_set", "miwv", "nearest_neighbors", "one_shot_sequence",
    "response_loss", "score_pool", "select_indices", "sequence_losses", "subset_size",
    "unconditional_sequence", "zero_shot_sequence",
]
