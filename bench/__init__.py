"""Benchmarks: `make bench-*` targets write bench/results/*.json and print a table."""
