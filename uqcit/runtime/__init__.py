"""Runtime: modules that run from stored codes (quantized, pruned, online rotations) and the C kernel."""
