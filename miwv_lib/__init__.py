"""MIWV: importance-aware data selection for instruction tuning — the paper's method, step by step.
Everything the notebooks and the command line use is importable from here."""

__version__ = "0.1.0"

# Names are imported on first use (PEP 562): ``import miwv_lib`` is instant, torch loads only when something needs
# it, and a Ctrl-C while it loads reaches the command line's handler instead of interrupting this file.
_LAZY = {name: module for module, names in {
    "method.layouts": "one_shot_sequence unconditional_sequence zero_shot_sequence",
    "method.losses": "response_loss sequence_losses",
    "method.importance": "ifd miwv",
    "method.neighbors": "embed_texts nearest_neighbors",
    "method.selection": "IFD_MAX Arm arm_name plan_arms select_arms select_indices subset_size",
    "method.pairwise": "summarize combine_orders winning_score bootstrap_interval parse_review",
    "data.datasets": "DataError InstructionPool format_source_text load_instructions load_test_set",
    "data.prompts": "encode_examples format_prompt",
    "data.models": "DEFAULT_MODEL LoadedModel build_tiny_model load_model load_embedder",
    "experiments.score": "ScoreConfig score_pool",
    "experiments.select": "export_subset",
    "experiments.train": "TrainConfig TrainResult train_model load_trained",
    "experiments.generate": "GenerateConfig generate_test_set write_generations",
    "experiments.judges": "LLMJudge HFChatBackend OpenAIChatBackend RougeJudge EmbeddingJudge "
                          "ReferenceLikelihoodJudge make_judge reference_nll",
    "experiments.evaluate": "ComparisonResult compare_generations judge_pair write_table plot_outcomes",
    "experiments.engine": "train_arms answer_arms run_comparison",
    "experiments.report": "write_report",
    "experiments.pipeline": "PipelineError run_pipeline",
}.items() for name in names.split()}
_MODULES = {"plots": "experiments.plots"}  # used as a module: ``from miwv_lib import plots``
__all__ = sorted(_LAZY) + sorted(_MODULES)


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:  # a submodule used as an attribute: miwv_lib.plots, miwv_lib.method, …
        return importlib.import_module(f".{_MODULES.get(name, name)}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists, but something it imports is missing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
