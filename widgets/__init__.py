"""The lab layer of UQCIT Workbench (ipywidgets + plotly ``FigureWidget``); holds no compression logic.

Views call the core (``uqcit.*``) and edit recipes; they share a ``LabState`` (selected
module, recipe, current plan). ``Workbench`` composes them in tabs::

    from uqcit.widgets import Workbench
    Workbench("smollm2-135m", sensitivity="benchmarks/results/sensitivity-smollm2-135m.safetensors")
"""
from ._base import ErrorBox, LabState, View, sync_figure
from .budget import AUTO, BudgetEditor
from .clusters import ClusterExplorer
from .evaluate import EvalPanel
from .export import ExportPanel, signing_available
from .levels import LevelMap
from .rotation import RotationView
from .workbench import QUICK_SENSITIVITY, Workbench, repo_sensitivity_file

__all__ = ["AUTO", "BudgetEditor", "ClusterExplorer", "ErrorBox", "EvalPanel", "ExportPanel", "LabState", "LevelMap",
           "QUICK_SENSITIVITY", "RotationView", "View", "Workbench", "repo_sensitivity_file", "signing_available",
           "sync_figure"]
