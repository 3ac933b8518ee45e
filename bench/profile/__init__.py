"""`bench profile`: per-stage and per-op breakdowns from each framework's own profiler, written as CSVs."""
