"""Benchmark scripts: they print measured figures (never asserted in tests)."""
