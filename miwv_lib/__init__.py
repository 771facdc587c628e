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
from .selection import Arm, arm_name, export_subset, plan_arms, select_arms, select_indices, subset_size  # noqa: E402
from . import plots  # noqa: E402
from .pipeline import PipelineError, run_pipeline  # noqa: E402
from .report import write_report  # noqa: E402

__all__ = [
    "Arm", "DEFAULT_MODEL", "DataError", "InstructionPool", "LoadedModel", "PipelineError", "ScoreConfig", "arm_name",
    "build_tiny_model", "plan_arms", "select_arms", "embed_texts", "encode_examples", "export_subset", "format_prompt", "ifd", "load_embedder",
    "load_instructions", "load_model", "load_test_set", "miwv", "nearest_neighbors", "one_shot_sequence", "plots",
    "response_loss", "run_pipeline", "score_pool", "select_indices", "sequence_losses", "subset_size",
    "unconditional_sequence", "write_report", "zero_shot_sequence",
]

# Fine-tuning, generation and pairwise evaluation, imported on first use: the Trainer stack is
# slow to import and the scoring command line does not need it.
_LAZY = {
    "TrainConfig": "train", "TrainResult": "train", "train_model": "train", "load_trained": "train",
    "train_arms": "experiment", "answer_arms": "experiment", "run_comparison": "experiment",
    "GenerateConfig": "generate", "generate_test_set": "generate",  # generate(): miwv_lib.generate.generate
    "write_generations": "generate",
    "ComparisonResult": "evaluate", "compare_generations": "evaluate",
    "judge_pair": "evaluate", "summarize": "evaluate", "combine_orders": "evaluate",
    "winning_score": "evaluate", "bootstrap_interval": "evaluate", "write_table": "evaluate",
    "plot_outcomes": "evaluate",
    "LLMJudge": "judges", "HFChatBackend": "judges", "OpenAIChatBackend": "judges", "RougeJudge": "judges",
    "EmbeddingJudge": "judges", "ReferenceLikelihoodJudge": "judges", "make_judge": "judges",
    "parse_review": "judges", "reference_nll": "judges",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
