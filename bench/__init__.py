"""hgbench runner: `python -m bench run|list|env` measures the Stacked Hourglass implementations in `impls/`.

The parent process never imports a framework: every measurement runs in a fresh worker process
(`bench.engine.worker`), one cell at a time, and comes back as a JSON result file.
"""
