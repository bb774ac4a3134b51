"""Tensor: storage formats, bit packing, quantize/dequantize, GPTQ, sparse storage, G structures.

Pure functions over tensors; knows nothing of models.
"""
