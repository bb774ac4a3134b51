"""What the server's fork server imports once, so that each job process starts with it loaded.

Importing torch, transformers' model classes and the stage modules takes seconds; a job process
forked from a process that holds them starts in milliseconds (``uqcit.server.jobs``). Importing
this module only imports: no thread, no torch parallel region (a fork after one is unsafe).
"""
import torch  # noqa: F401
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401  (the built-in models' family)

from uqcit.core.config import load_stage_modules
from uqcit.server import worker  # noqa: F401

load_stage_modules()  # imports the allow-listed stage modules (registration only)
