"""Inputs: models, tiny test models, corpora and windows, calibration statistics, self-generated text."""
