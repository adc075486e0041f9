"""Benchmarks: `make bench-*` targets write bench/results/*.json and print a table.

Known harmless library noise is filtered here, before any benchmark imports torchao (whose
import logs it), through the same module as the command line.
"""

from bibo_export.logs import silence_known_noise

silence_known_noise()
