"""Loads the UQCIT package it sits in through transformers' own entry point.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("PACKAGE", trust_remote_code=True)

UQCIT Workbench copies this file into every package (``uqcit.package.remote`` writes it and the
``auto_map`` of ``config.json`` that points transformers here). It holds no model code: the model is
the one ``uqcit.load_package`` builds (the package's packed codes, rotations and compensation, its
logits), so loading needs the workbench installed: ``pip install uqcit-workbench``.
"""
from transformers import PreTrainedModel


class UqcitModel(PreTrainedModel):
    """Stands in for the package's model class: ``from_pretrained`` returns what ``uqcit.load_package`` builds."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # Imported here, inside a try: transformers' import check skips try blocks, so a missing
        # workbench gets this message (naming the right pip package) instead of a generic one.
        try:
            from uqcit.package.remote import from_pretrained
        except ImportError as exc:
            raise ImportError("this UQCIT package loads through UQCIT Workbench, which is not installed: "
                              "pip install uqcit-workbench") from exc
        return from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
