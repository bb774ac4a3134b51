"""What a package stores about a compressed model, as one typed record.

Every stage result that yields a storable model (``QuantizeResult``, ``CompensateResult``,
``PruneResult``, and a ``RetrainResult`` applied to one of them) builds an ``ExportRecord``
with its ``export_record()`` method; ``uqcit.package.export_package`` writes that record and
nothing else, so the writer never guesses which result it was given.

>>> m = ModuleRecord("fc", level=3, numel=64, stored_bits=256, rel_error=0.1, sqnr_db=20.0)
>>> weight_noise_profile([m])["modules"]
{'fc': {'rel_error': 0.1, 'sqnr_db': 20.0}}
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol

if TYPE_CHECKING:  # core stays free of torch at import; the record only carries the model
    import torch


@dataclasses.dataclass(frozen=True)
class ModuleRecord:
    """One compressed module as the package records it (a tied duplicate stores nothing)."""

    name: str
    level: int
    numel: int  # weights of the module before compression
    stored_bits: int  # every bit stored for it: codes, scales, masks, sparse indices, compensation
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    sqnr_db: float
    tied_to: str | None = None  # the module whose storage it shares


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """A compressed model and the measured figures its package records.

    ``bpw`` and ``stored_bits`` are the result's own figures (a quantized model's ``bpw``
    also counts its online rotations, which ``stored_bits`` does not).
    """

    model: "torch.nn.Module"  # the model whose modules are written (quantized, masked, float)
    method: str  # e.g. ``rtn-w4-g128``, ``comp-lr8-gptq-w3-g128``, ``prime-tau0.8``
    bpw: float  # stored bits per weight of the compressed modules
    stored_bits: int  # bits of the compressed modules' storage
    weight_count: int  # weights of the compressed modules (tied duplicates once)
    modules: tuple[ModuleRecord, ...]
    plan: Mapping[str, Any] | None = None  # the bit plan's dict; None for a pruned model
    noise_profile: Mapping[str, Any] | None = None  # validation/noise_profile.json unless measured apart
    pruning: Mapping[str, Any] | None = None  # a pruned model: {"config": ..., "accounting": ...}
    sparse_value_dtype: str = "float32"  # dtype of the kept values of pruned layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))

    @property
    def stored(self) -> tuple[ModuleRecord, ...]:
        """Modules whose bits are stored (tied duplicates excluded)."""
        return tuple(m for m in self.modules if m.tied_to is None)

    def by_name(self) -> dict[str, ModuleRecord]:
        return {m.name: m for m in self.modules}


class Exportable(Protocol):
    """A stage result that can be written as a package."""

    def export_record(self) -> ExportRecord: ...


def module_records(modules: Iterable[Any]) -> tuple[ModuleRecord, ...]:
    """``ModuleRecord``s of a result's per-module records (``ModuleQuant``, ``ModulePrune``)."""
    return tuple(ModuleRecord(name=m.name, level=m.level, numel=m.numel, stored_bits=m.stored_bits,
                              rel_error=m.rel_error, sqnr_db=m.sqnr_db, tied_to=m.tied_to) for m in modules)


def weight_noise_profile(modules: Iterable[ModuleRecord]) -> dict[str, Any]:
    """The ``noise_profile.json`` of a result that measured only weight errors: per stored module."""
    return {"measure": "relative weight error ||W - W_hat|| / ||W|| per quantized module",
            "modules": {m.name: {"rel_error": m.rel_error, "sqnr_db": m.sqnr_db}
                        for m in modules if m.tied_to is None}}
