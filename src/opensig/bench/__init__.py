"""Benchmarks that print figures: `openset` (methods side by side), `warm-start` (epochs a
retrain needs) and `speed` (throughput).

Empty on purpose: `opensig` imports `opensig.bench.options` at every start, which runs this
file first, so that its code would count as every dvc stage's code dep.
"""
