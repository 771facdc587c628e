"""MIWV: importance-aware data selection for instruction tuning — the paper's method, step by step.

Everything the notebooks and the command line use is importable from here.
"""

__version__ = "0.1.0"

# Every name is imported on first use (PEP 562), so ``import miwv_lib`` and ``python -m miwv_lib`` are
# instant: the torch/transformers stack loads only when something needs it, and a Ctrl-C while it
# loads reaches the command line's handler instead of interrupting this file.
_LAZY = {
    "DataError": "data", "InstructionPool": "data", "load_instructions": "data", "load_test_set": "data",
    "DEFAULT_MODEL": "models", "LoadedModel": "models", "build_tiny_model": "models", "load_model": "models",
    "embed_texts": "neighbors", "load_embedder": "neighbors", "nearest_neighbors": "neighbors",
    "encode_examples": "prompts", "format_prompt": "prompts",
    "ScoreConfig": "scoring", "ifd": "scoring", "miwv": "scoring", "one_shot_sequence": "scoring",
    "response_loss": "scoring", "score_pool": "scoring", "sequence_losses": "scoring",
    "unconditional_sequence": "scoring", "zero_shot_sequence": "scoring",
    "Arm": "selection", "arm_name": "selection", "export_subset": "selection", "plan_arms": "selection",
    "select_arms": "selection", "select_indices": "selection", "subset_size": "selection",
    "PipelineError": "pipeline", "run_pipeline": "pipeline", "write_report": "report",
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
__all__ = sorted(_LAZY) + ["plots"]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:  # a submodule used as an attribute: miwv_lib.plots, miwv_lib.scoring, …
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists, but something it imports is missing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
