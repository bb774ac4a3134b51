"""Packages leaving the workbench: a compressed-tensors checkpoint (``compressed_tensors``: transformers
and vLLM run the integer codes), a llama.cpp GGUF (``gguf``) and a plain float transformers checkpoint (``hf``)."""
from uqcit.export.compressed_tensors import CompressedTensorsExport, export_compressed_tensors
from uqcit.export.gguf import GgufExport, export_gguf, gguf_formats, gguf_type
from uqcit.export.hf import ExportError, export_dequantized

__all__ = ["CompressedTensorsExport", "ExportError", "GgufExport", "export_compressed_tensors", "export_dequantized",
           "export_gguf", "gguf_formats", "gguf_type"]
