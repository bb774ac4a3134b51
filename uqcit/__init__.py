"""UQCIT Workbench: inspectable stages for compressing transformer language models."""
__version__ = "0.1.0"
