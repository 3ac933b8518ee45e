"""Regression checks: `bench compare` (two runs, cell by cell) and the CI gate `python -m bench.regress.ab_check`."""
