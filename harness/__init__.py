"""qcrash's drivers and judges: fault layer, crash states, operations, runner, oracle, CLI, reports."""

__version__ = "0.1.0"
