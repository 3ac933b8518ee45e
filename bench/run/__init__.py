"""`bench run` and its stages (equivalence check, calibration, cells), plus `bench list`, `env` and `overhead`."""
