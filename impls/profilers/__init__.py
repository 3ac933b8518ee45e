"""Each framework's profile() implementation, one module per framework: `<framework>_profiling.py`.

Each module imports exactly one framework and the model module beside it (impls/<framework>_hourglass.py);
impls.profiling.framework_profile imports it on the first profile() call, so a benchmark run never loads
a profiler, and the model module never imports its profiler (no import cycle). This package's own
__init__ imports nothing.
"""
