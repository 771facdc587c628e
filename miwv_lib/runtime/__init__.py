"""The runtime: run-file primitives (atomic files, append-only logs, manifests with fingerprints, a run
lock), distributed helpers, and the configuration schema the CLI flags and YAML files derive from."""
