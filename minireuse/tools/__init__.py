"""The report verbs of the command line, on top of training: benchmarks of the layers
(bench.py) and of a whole step (bench_step.py), exact against reuse runs (compare.py),
time to accuracy (parity.py, with pytorch_run.py as its anchor), a saved model's test
accuracy (evaluate.py) and curves of runs (plot.py)."""
