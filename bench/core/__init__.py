"""Shared ground of every command: settings, the run directory, statistics, files, environment, console.

Imports nothing else from bench/ and no framework.
"""
