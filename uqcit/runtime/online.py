"""Run-time rotations that cannot be folded into a weight, and their storage in a package.

``uqcit.stages.rotation`` folds what it can into weights; what stays online lives here as small
modules (``OnlineRotation``, ``RotatedGatedMLP``, ``RotatedRMSNorm``, input pre-hooks), with
``rotation_tensors_for_layer_dir`` / ``apply_online_rotations`` to store and re-install them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from uqcit.core.names import block_of, layer_dir
from uqcit.runtime.modules import replace_module
from uqcit.tensor.structures import Rotation, kron_apply, structure_factors

# =============================================================================================
# run-time modules: online rotations that cannot be folded into a weight


class OnlineRotation(nn.Module):
    """Applies x ↦ x G at run time (last dimension). Its persistent buffers are exactly what is
    stored: packed sign bits + layout for a structure, or the float32 matrix for a dense G.

    ``enabled = False`` turns it into the identity (used only to time its cost).
    """

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.n = rotation.n
        self.kind = rotation.kind
        self.factors = rotation.layout  # (m, b) for a structure; the "layout" buffer stores the same
        self.description = rotation.describe()
        self.enabled = True
        for name, t in rotation.tensors().items():
            self.register_buffer(name, t.clone(), persistent=True)
        if rotation.kind == "structure":
            a, b = structure_factors(*rotation.layout)
            self.register_buffer("_signs", rotation.signs.to(torch.float32), persistent=False)
            self.register_buffer("_a", a.to(torch.float32), persistent=False)
            self.register_buffer("_b", b.to(torch.float32), persistent=False)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "OnlineRotation":
        if "matrix" in tensors:
            n = tensors["matrix"].shape[0]
        else:
            m, b = (int(v) for v in tensors["layout"].tolist())
            n = m * b
        return cls(Rotation.from_tensors(tensors, n))

    @property
    def stored_bits(self) -> int:
        return sum(8 * t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.shape[-1] != self.n:
            raise ValueError(f"online rotation of order {self.n} got inputs of width {x.shape[-1]}")
        if self.kind == "dense":
            return x @ self.matrix.to(x.dtype)
        d = self._signs.to(x.dtype)
        return kron_apply(x * d, self._a.to(x.dtype), self._b.to(x.dtype)) * d

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.description}, stored_bits={self.stored_bits}"


class RotatedGatedMLP(nn.Module):
    """A gated MLP (Llama/Mistral/Qwen2) whose down_proj input is rotated online.

    Holds the original MLP's children under their own names (``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn``), so any quantizer that replaces ``...mlp.down_proj`` by name
    still finds it, and the rotation survives the replacement:
    ``down_proj(online_rotation(act_fn(gate_proj(x)) * up_proj(x)))``.
    """

    def __init__(self, mlp: nn.Module, rotation: OnlineRotation):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                raise TypeError(f"{type(mlp).__name__} has no {name}: not a gated MLP")
        for name, child in mlp.named_children():
            if name != "online_rotation":
                self.add_module(name, child)
        self.act_fn = mlp.act_fn  # an nn.Module in transformers (ACT2FN), kept as a child
        self.online_rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.online_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class RotatedRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale g acts in the unrotated basis of a rotated residual stream.

    Input h' = h G. Output ((n(h') Gᵀ) ⊙ g) G = −((n(h') G) ⊙ g) G, with n the scale-free RMS
    normalization; equals RMSNorm_g(h)·G. It lets a tied LM head (whose weight is the rotated
    embedding E G) keep its tie: the scale cannot be folded into a shared matrix.
    ``weight`` keeps the name and value of the original norm's scale.
    """

    def __init__(self, weight: torch.Tensor, eps: float, rotation: OnlineRotation):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.variance_epsilon = eps
        self.scale_rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = h.to(dtype)
        return -self.scale_rotation(self.scale_rotation(h) * self.weight.to(dtype))


def _input_rotation_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_rotation(args[0]),) + tuple(args[1:])


def attach_input_rotation(module: nn.Module, rotation: OnlineRotation) -> None:
    """Rotate ``module``'s first input online (generic fallback): child ``input_rotation`` + a
    forward pre-hook. Replacing the module (e.g. by a ``QuantLinear``) drops both; re-attach with
    ``apply_online_rotations``."""
    if hasattr(module, "input_rotation") and isinstance(module.input_rotation, OnlineRotation):
        module.input_rotation = rotation  # the hook is already there
        return
    module.input_rotation = rotation
    module.register_forward_pre_hook(_input_rotation_hook)


# Child names of the three kinds of site: RotatedGatedMLP, RotatedRMSNorm, a generic Linear.
_SITES = ("online_rotation", "scale_rotation", "input_rotation")


def is_rotation_key(key: str) -> bool:
    """Whether a state-dict key belongs to an online rotation (stored in rotation.safetensors)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in _SITES and parts[-1] in ("signs", "layout", "matrix")


def rotation_tensors_for_layer_dir(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every online rotation's stored tensors, grouped by package layer folder.

    Keys are full state-dict keys (e.g. ``model.layers.3.mlp.online_rotation.signs``); folders
    are named by ``uqcit.core.names.layer_dir`` (``layer_003``, ``outer``). Folded rotations
    store nothing and do not appear.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, OnlineRotation):
            layer = layer_dir(block_of(name))
            for key, t in mod.state_dict().items():
                out.setdefault(layer, {})[f"{name}.{key}"] = t.detach().contiguous()
    return out


def apply_online_rotations(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Install the online rotations described by ``tensors`` (keys as written by
    ``rotation_tensors_for_layer_dir``) into ``model``, in place; returns the sites installed.

    Works on a model freshly built from its config (package loading: call it after the weights
    are loaded), and on a model whose linear layers were replaced by quantized ones (it
    re-attaches generic input rotations that the replacement dropped). Idempotent.
    """
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not is_rotation_key(key):
            raise ValueError(f"{key!r} is not an online-rotation tensor key")
        site, _, tname = key.rpartition(".")
        sites.setdefault(site, {})[tname] = t
    done = []
    for site, ts in sorted(sites.items()):
        owner_name, _, kind = site.rpartition(".")
        rot = OnlineRotation.from_tensors(ts)
        owner = model.get_submodule(owner_name)
        if kind == "online_rotation":
            if isinstance(owner, RotatedGatedMLP):
                owner.online_rotation = rot
            else:
                replace_module(model, owner_name, RotatedGatedMLP(owner, rot))
        elif kind == "scale_rotation":
            if isinstance(owner, RotatedRMSNorm):
                owner.scale_rotation = rot
            else:
                eps = getattr(owner, "variance_epsilon", getattr(owner, "eps", None))
                if eps is None or not hasattr(owner, "weight"):
                    raise TypeError(f"{owner_name} ({type(owner).__name__}) is not an RMSNorm")
                replace_module(model, owner_name, RotatedRMSNorm(owner.weight, eps, rot))
        else:
            attach_input_rotation(owner, rot)
        done.append(site)
    return done


def _set_online_enabled(model: nn.Module, enabled: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, OnlineRotation):
            mod.enabled = enabled
