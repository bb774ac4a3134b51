"""Packages leaving the workbench: a plain transformers checkpoint (``hf``) and a llama.cpp GGUF (``gguf``)."""
from uqcit.export.gguf import GgufExport, export_gguf, gguf_type
from uqcit.export.hf import ExportError, export_dequantized

__all__ = ["ExportError", "GgufExport", "export_dequantized", "export_gguf", "gguf_type"]
