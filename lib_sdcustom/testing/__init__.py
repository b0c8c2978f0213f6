"""Generated inputs for the tests and benchmarks: tiny seeded checkpoints of each family in the real LDM layout,
and small sample images. Nothing here is used by a training run."""
