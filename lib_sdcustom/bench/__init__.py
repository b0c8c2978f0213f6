"""Benchmarks: speed and memory figures printed as numbers and ratios, never asserted in tests."""
