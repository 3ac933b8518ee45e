"""hgbench runner: `python -m bench run|list|env|overhead|compare|report|profile`.

Packages by job, dependencies pointing one way (tests/test_layout.py enforces it):
core (settings, run directory, statistics, files, environment, console) <- engine (the typed worker
protocol, launch, worker, timing, the shared cell loop) <- run, profile <- report, regress (compare and
the CI gate) <- experiments <- cli. The parent process never imports a framework: every measurement runs
in a fresh worker process (`bench.engine.worker`), one cell at a time.
"""
