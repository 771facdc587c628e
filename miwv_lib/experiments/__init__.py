"""The experiments: the stages (score, select, train, generate, judge, report), the engine that runs them
for every arm, the notebook pipeline, the reproduction study and the command line."""
