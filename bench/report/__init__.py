"""`bench report`: figures, report.md and a self-contained report.html from run and profile directories.

Reads run directories through bench.core.rundir only; plots never measure.
"""
