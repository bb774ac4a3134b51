"""What a streamed quantize job (``uqcit.stream.job.compress_streamed``) wrote and what it cost.

>>> r = StreamReport(model="m", method="rtn-w4-g128", package="pkg", bpw=4.25, package_bytes=2**20,
...                  float_bytes=2**22, blocks=2, resumed_at=0, block_seconds=[0.5, 0.5], seconds={},
...                  peak_rss_bytes=2**27)
>>> r.summary()
'm → rtn-w4-g128 (streamed, 2 blocks): 4.250 bits/weight, 1.0 MiB package from 4.0 MiB float, peak RSS 128 MiB'
"""
from __future__ import annotations

import dataclasses
from typing import Any

from uqcit.core.results import Result, html_table


@dataclasses.dataclass(repr=False)
class StreamReport(Result):
    """What a streamed job wrote and what it cost, block by block."""

    model: str
    method: str
    package: str
    bpw: float
    package_bytes: int
    float_bytes: int  # the source model's parameters in float32 (from shapes; never all in memory)
    blocks: int
    resumed_at: int  # the first block this run computed (0: a fresh run)
    block_seconds: list[float]  # per block computed by this run
    seconds: dict[str, float]
    peak_rss_bytes: int  # this process's peak resident memory (ru_maxrss) when the job ended
    device: str = "cpu"  # where the statistics and GPTQ ran

    def summary(self) -> str:
        return (f"{self.model} → {self.method} (streamed, {self.blocks} blocks): {self.bpw:.3f} bits/weight, "
                f"{self.package_bytes / 2**20:.1f} MiB package from {self.float_bytes / 2**20:.1f} MiB float, "
                f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("method", self.method), ("bits/weight", f"{self.bpw:.3f}"),
                ("package bytes", f"{self.package_bytes:,}"), ("float32 parameter bytes", f"{self.float_bytes:,}"),
                ("blocks (resumed at)", f"{self.blocks} ({self.resumed_at})"), ("device", self.device),
                ("peak RSS", f"{self.peak_rss_bytes / 2**20:.0f} MiB")]
        return rows + [(f"time: {k}", f"{v:.1f} s") for k, v in self.seconds.items()]

    def format_table(self) -> str:
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in self.rows())

    def _repr_html_(self) -> str:
        return f"<p><b>StreamReport</b>: {self.summary()}</p>" + html_table(("", ""), self.rows())

    def figure(self):
        import plotly.graph_objects as go

        x = list(range(self.resumed_at, self.resumed_at + len(self.block_seconds)))
        fig = go.Figure(go.Bar(x=x, y=self.block_seconds, uid="stream-blocks"))
        fig.update_layout(title="Seconds per block", xaxis_title="block", height=320)
        return fig
