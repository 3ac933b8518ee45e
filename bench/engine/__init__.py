"""The engine that runs one measurement in a fresh worker process: the typed protocol, launch, worker, timing.

Only `bench.engine.worker` (in the child process) loads a framework; imports bench.core only.
"""
