"""Helpers for the tests and benchmarks (starting/stopping services), not used by the pipeline."""
