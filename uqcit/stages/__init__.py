"""Stages: one module per pipeline stage, each with its config, pure function, result and handler."""
