"""Experiments that measure the regression checks themselves (false alarms, detection); not part of a run."""
