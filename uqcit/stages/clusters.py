"""GHZ cluster detection (seed 002 §2.2.2.1): groups of strongly correlated output channels.

For each selected module, the Pearson correlation between its output channels is computed
from one of two sources:

- ``"weights"``: the rows of the ``[out, in]`` weight matrix (each row is a vector over the
  inputs);
- ``"activations"``: the module's outputs on calibration text (each channel is a vector over
  the calibration tokens), collected with forward hooks in one pass of the model;
- ``"both"``: a pair is linked only when both correlations pass the threshold (the stricter,
  more confident reading of "correlated").

Two channels are *linked* when ``|corr| > threshold`` (0.7 by default, as in the seed). A
cluster is a **connected component** of the link graph with two or more channels: chains count
(a~b and b~c put a, b and c together even when a and c are not linked). Components are
deterministic and nest as the threshold moves: lowering it only merges clusters, never splits
them. A channel with zero variance has no defined correlation and is never linked.

Big matrices: the correlation of ``rows`` channels is ``rows²`` floats. Modules with more than
``max_rows`` rows are skipped and listed in ``ClustersResult.skipped`` with the reason; with the
default settings that is only the embedding (49,152 rows for SmolLM2: a 9.7 GB matrix), which
the default selection (linear modules) leaves out anyway.

"Shared precision" in this workbench: a whole-module format already gives every row of a
cluster the same precision. For mixed formats (a top fraction of weights at high precision,
chosen by importance) ``apply_clusters_to_importance`` makes every row of a cluster carry,
column by column, the largest importance any row of the cluster has in that column. The
top-k selection then takes a column of a cluster for all its rows at once (they tie; only the
last tie at the top-k boundary can be split, by the quantizer's row-major tie-break). The
number of high-precision weights is fixed by the format, so clusters change *which* weights
are kept high, not how many bits are stored.

>>> import torch
>>> w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
>>> w[5] = 2 * w[3] + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(1))
>>> find_clusters(row_correlation(w), 0.7)
[[3, 5]]
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import torch
from torch import nn

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.stages.levels import select_modules
from uqcit.core.results import Result

_FIGURE_PIXELS = 128  # heatmaps are max-pooled down to at most this many rows and columns


@register_config
@dataclasses.dataclass(frozen=True)
class ClustersConfig(StageConfig):
    """Which correlations to compute and where to cut them."""

    type_tag = "clusters"

    threshold: float = 0.7  # |corr| above this links two channels (seed 002 §2.2.2.1)
    source: Literal["weights", "activations", "both"] = "weights"  # what is correlated
    modules: str | None = None  # regex (re.search) on module names; None: every linear module
    max_rows: int = 8192  # larger modules (embeddings) are skipped: their matrix would be rows² floats
    calib_samples: int = 4  # activations only: calibration sequences
    calib_seq_len: int = 256  # activations only: tokens per sequence
    seed: int = 0  # activations only: picks the calibration sequences

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 <= self.threshold < 1.0, "threshold", "must be in [0, 1)")
        for name in ("max_rows", "calib_samples", "calib_seq_len"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")


# --------------------------------------------------------------------------- pure functions


def row_correlation(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of ``x`` ``[rows, samples]``: ``[rows, rows]`` float32.

    Rows with zero variance correlate 0 with everything (and 1 with themselves).
    """
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"need a [rows, samples] matrix with at least 2 samples, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    x = torch.where(norm > 0, x / norm.clamp(min=1e-300), torch.zeros_like(x))
    corr = (x @ x.t()).clamp_(-1.0, 1.0).to(torch.float32)
    corr.fill_diagonal_(1.0)
    return corr


def find_clusters(corr: torch.Tensor, threshold: float, also: torch.Tensor | None = None) -> list[list[int]]:
    """Connected components of ``|corr| > threshold`` with 2+ members (and of ``also`` when given).

    Clusters are sorted lists of row indices, largest cluster first (ties: lowest first row).
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    linked = corr.abs() > threshold
    if also is not None:
        linked &= also.abs() > threshold
    linked.fill_diagonal_(False)
    rows, cols = torch.nonzero(linked, as_tuple=True)
    if rows.numel() == 0:
        return []
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = corr.shape[0]
    graph = coo_matrix((np.ones(rows.numel(), dtype=np.int8), (rows.numpy(), cols.numpy())), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    clusters = [g for g in groups.values() if len(g) >= 2]
    return sorted(clusters, key=lambda g: (-len(g), g[0]))


def apply_clusters_to_importance(importance: torch.Tensor, clusters: list[list[int]]) -> torch.Tensor:
    """A copy of ``importance`` ``[out, in]`` where each cluster's rows share their column-wise max.

    With it, a mixed format's top-k selection keeps a column of a cluster together: every row of
    the cluster has the same importance there (see the module doc for what is shared).
    """
    if importance.dim() != 2:
        raise ValueError(f"importance must be [out, in], got shape {tuple(importance.shape)}")
    out = importance.clone()
    for cluster in clusters:
        idx = torch.as_tensor(cluster, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= importance.shape[0]):
            raise IndexError(f"cluster rows {cluster[:5]}... out of range for {importance.shape[0]} rows")
        out[idx] = importance[idx].amax(dim=0)
    return out


# --------------------------------------------------------------------------- result


@dataclasses.dataclass
class ModuleClusters:
    """The clusters of one module."""

    name: str
    level: int
    block: int | None
    rows: int
    clusters: list[list[int]]
    max_offdiag: float  # largest |corr| between two different channels

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]

    @property
    def rows_in_clusters(self) -> int:
        return sum(self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "block": self.block, "rows": self.rows,
                "count": len(self.clusters), "sizes": self.sizes, "rows_in_clusters": self.rows_in_clusters,
                "max_offdiag": self.max_offdiag, "clusters": self.clusters}


@dataclasses.dataclass(repr=False)
class ClustersResult(Result):
    """Clusters per module, the settings that found them, and what was skipped and why."""

    config: ClustersConfig
    modules: list[ModuleClusters]
    skipped: dict[str, str]  # module -> reason
    seconds: float
    # Downsampled |corr| per module (rows reordered so clusters are contiguous) and where each
    # cluster lies in that order; for figures only, not part of to_dict.
    _images: dict[str, tuple[torch.Tensor, list[tuple[int, int]], int]] = dataclasses.field(
        default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {m.name: m for m in self.modules}

    def module(self, name: str) -> ModuleClusters:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no clusters computed for {name!r}"
                           + (f" (skipped: {self.skipped[name]})" if name in self.skipped else "")) from None

    def clusters_of(self, name: str) -> list[list[int]]:
        return self.module(name).clusters

    @property
    def n_clusters(self) -> int:
        return sum(len(m.clusters) for m in self.modules)

    @property
    def rows_in_clusters(self) -> int:
        return sum(m.rows_in_clusters for m in self.modules)

    @property
    def total_rows(self) -> int:
        return sum(m.rows for m in self.modules)

    def size_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.modules:
            for s in m.sizes:
                out[s] = out.get(s, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        text = (f"{self.n_clusters} clusters ({self.rows_in_clusters:,} of {self.total_rows:,} channels) in "
                f"{len(self.modules)} modules at |corr| > {self.config.threshold:g} ({self.config.source}), "
                f"{self.seconds:.1f} s")
        if self.skipped:
            text += f"; {len(self.skipped)} skipped"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "n_clusters": self.n_clusters,
                "rows_in_clusters": self.rows_in_clusters, "total_rows": self.total_rows,
                "size_counts": {str(k): v for k, v in self.size_counts().items()},
                "seconds": self.seconds, "skipped": self.skipped,
                "modules": [m.to_dict() for m in self.modules]}

    def for_layer_dir(self) -> dict[str, dict[str, Any]]:
        """``ghz_clusters.json`` content per package layer folder (``layer_NNN`` or ``outer``)."""
        out: dict[str, dict[str, Any]] = {}
        for m in self.modules:
            layer = "outer" if m.block is None else f"layer_{m.block:03d}"
            d = out.setdefault(layer, {"computed": True, "threshold": self.config.threshold,
                                       "source": self.config.source, "method": "connected components",
                                       "clusters": [], "modules": {}})
            d["clusters"] += [{"module": m.name, "rows": c} for c in m.clusters]
            d["modules"][m.name] = {"rows": m.rows, "count": len(m.clusters), "sizes": m.sizes,
                                    "max_offdiag": m.max_offdiag}
        return out

    def table_rows(self):
        return (("module", "level", "rows", "clusters", "channels in clusters", "largest", "max |corr|"),
                [(m.name, m.level, m.rows, len(m.clusters), m.rows_in_clusters, max(m.sizes, default=0),
                  m.max_offdiag) for m in self.modules])

    def figure(self, module: str | None = None):
        """|corr| heatmap of ``module`` (default: the one with most clusters), clusters outlined.

        Rows are reordered so each cluster is contiguous (clusters first), then max-pooled to at
        most 128 × 128 pixels with the diagonal left out, so strong pairs stay visible.
        """
        import plotly.graph_objects as go

        if module is None:
            if not self.modules:
                raise ValueError("no module was analysed")
            module = max(self.modules, key=lambda m: (len(m.clusters), m.max_offdiag)).name
        m = self.module(module)
        image, spans, scale = self._images[module]
        fig = go.Figure(go.Heatmap(uid=f"clusters-{module}", z=image.tolist(), zmin=0, zmax=1,
                                   colorscale="Blues", colorbar=dict(title="|corr|")))
        for k, (a, b) in enumerate(spans):
            lo, hi = a // scale - 0.5, -(-b // scale) - 0.5  # whole pixels, so small clusters stay visible
            fig.add_shape(type="rect", x0=lo, x1=hi, y0=lo, y1=hi, line=dict(color="#e45756", width=1.5),
                          name=f"cluster {k}")
        fig.update_yaxes(autorange="reversed", title=f"channel (clusters first; 1 pixel = {scale} rows)")
        fig.update_xaxes(title="channel")
        fig.update_layout(title=f"{module}: {len(m.clusters)} clusters at |corr| > {self.config.threshold:g} "
                                f"({self.config.source})", height=560, width=620, template="plotly_white")
        return fig

    def size_figure(self):
        """Histogram of cluster sizes over every analysed module."""
        import plotly.graph_objects as go

        counts = self.size_counts()
        fig = go.Figure(go.Bar(uid="cluster-sizes", x=[str(s) for s in counts], y=list(counts.values())))
        fig.update_layout(title=f"Cluster sizes — {self.summary()}", xaxis_title="channels per cluster",
                          yaxis_title="clusters", template="plotly_white", height=360)
        return fig


# --------------------------------------------------------------------------- detection


def detect_clusters(model: nn.Module, levels, config: ClustersConfig = ClustersConfig(), tokenizer=None, *,
                    text: str | None = None, progress: bool = True) -> ClustersResult:
    """Find correlated output channels in each selected module (see the module doc).

    ``tokenizer`` is needed for the ``"activations"`` and ``"both"`` sources (calibration
    text: ``uqcit.inputs.corpus.calibration_batch``, or ``text``).
    """
    from tqdm.auto import tqdm

    from uqcit.runtime.modules import linear_weight

    t0 = time.perf_counter()
    # Without a pattern the embedding is left out: its 49,152-row correlation matrix is too big.
    entries = (select_modules(levels, config.modules) if config.modules is not None
               else [e for e in select_modules(levels, None) if e.kind != "embedding"])
    named = dict(model.named_modules())
    skipped: dict[str, str] = {}
    chosen = []
    for e in entries:
        if e.shape[0] > config.max_rows:
            skipped[e.name] = (f"{e.shape[0]} rows > max_rows {config.max_rows} "
                               f"(a {e.shape[0]}² correlation matrix)")
        else:
            chosen.append(e)
    acts = None
    if config.source in ("activations", "both"):
        if tokenizer is None:
            raise ValueError(f"source {config.source!r} needs a tokenizer for the calibration text")
        acts = _collect_outputs(model, named, chosen, tokenizer, config, text)

    results, images = [], {}
    for e in tqdm(chosen, desc="clusters", unit="module", disable=not progress):
        module = named[e.name]
        corr_w = corr_a = None
        if config.source in ("weights", "both"):
            w = module.weight.detach() if e.kind == "embedding" else linear_weight(module)[0]
            corr_w = row_correlation(w)
        if acts is not None:
            corr_a = row_correlation(acts.pop(e.name).t())
        corr = corr_w if corr_w is not None else corr_a
        clusters = find_clusters(corr, config.threshold, also=corr_a if corr_w is not None else None)
        shown = corr.abs() if corr_a is None or corr_w is None else torch.minimum(corr_w.abs(), corr_a.abs())
        off = shown.clone().fill_diagonal_(0.0)
        results.append(ModuleClusters(e.name, e.level, e.block, e.shape[0], clusters, float(off.max())))
        images[e.name] = _image(off, clusters)
    return ClustersResult(config=config, modules=results, skipped=skipped,
                          seconds=time.perf_counter() - t0, _images=images)


def _collect_outputs(model, named, entries, tokenizer, config: ClustersConfig, text) -> dict[str, torch.Tensor]:
    """Outputs ``[tokens, out]`` (float32) of each module on the calibration batch, by hooks."""
    from uqcit.inputs.corpus import calibration_batch

    ids = calibration_batch(tokenizer, n_samples=config.calib_samples, seq_len=config.calib_seq_len,
                            seed=config.seed, text=text)
    outs: dict[str, list[torch.Tensor]] = {e.name: [] for e in entries}
    handles = []

    def hook(name: str):
        def fn(module, args, output):
            outs[name].append(output.detach().reshape(-1, output.shape[-1]).to(torch.float32))
        return fn

    try:
        for e in entries:
            handles.append(named[e.name].register_forward_hook(hook(e.name)))
        with torch.no_grad():
            for x in ids.split(1):  # one sequence at a time: the model's memory stays small
                model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in outs.items()}


def _image(off: torch.Tensor, clusters: list[list[int]]) -> tuple[torch.Tensor, list[tuple[int, int]], int]:
    """Rows/columns reordered (clusters first, contiguous), max-pooled to <= 128 pixels."""
    n = off.shape[0]
    in_clusters = [r for c in clusters for r in c]
    member = set(in_clusters)
    order = torch.as_tensor(in_clusters + [r for r in range(n) if r not in member], dtype=torch.long)
    spans, start = [], 0
    for c in clusters:
        spans.append((start, start + len(c)))
        start += len(c)
    scale = max(1, -(-n // _FIGURE_PIXELS))
    m = off[order][:, order]
    pooled = torch.nn.functional.max_pool2d(m[None, None], kernel_size=scale, stride=scale, ceil_mode=True)[0, 0]
    return pooled, spans, scale


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(ClustersConfig)
def _clusters_stage(session: StageSession, cfg: ClustersConfig) -> ClustersResult:
    levels = session.require("levels")
    return detect_clusters(session.working, levels, cfg, session.tokenizer, progress=session.progress)
