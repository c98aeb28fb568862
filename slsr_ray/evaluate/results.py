"""Evaluation results: a table (R1/R5/R10/R20/mAP/mINP in %), JSON, and CMC-curve plots."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage

TABLE_RANKS = (1, 5, 10, 20)


@dataclass
class RankResult:
    """One evaluation: CMC curve and mAP/mINP as fractions; ``std`` holds trial std-devs when aggregated."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    name: str = ""
    num_trials: int = 1
    std: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, metrics: dict, name: str = "") -> RankResult:
        """Wrap the dict returned by :func:`slsr_ray.evaluate.evaluate_rank` (or an aggregate)."""
        return cls(
            cmc=np.asarray(metrics["cmc"], dtype=np.float64),
            mAP=float(metrics["mAP"]),
            mINP=float(metrics.get("mINP", float("nan"))),
            num_valid_queries=int(metrics.get("num_valid_queries", 0)),
            name=name or metrics.get("name", ""),
            num_trials=int(metrics.get("num_trials", 1)),
            std=metrics.get("std"),
        )

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based) as a fraction; NaN when the curve is shorter than k."""
        return float(self.cmc[k - 1]) if 1 <= k <= len(self.cmc) else float("nan")

    def summary(self) -> dict[str, float]:
        """R1/R5/R10/R20/mAP/mINP in percent."""
        out = {f"R{k}": 100 * self.rank(k) for k in TABLE_RANKS}
        out["mAP"] = 100 * self.mAP
        out["mINP"] = 100 * self.mINP
        return out

    def table(self) -> str:
        return format_table({self.name or "result": self})

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "cmc": [float(x) for x in self.cmc],
            "mAP": self.mAP,
            "mINP": self.mINP,
            "num_valid_queries": self.num_valid_queries,
            "num_trials": self.num_trials,
            "summary_percent": self.summary(),
        }
        if self.std is not None:
            d["std"] = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in self.std.items()}
        if self.extra:
            d["extra"] = self.extra
        return d

    def to_json(self, uri: str) -> None:
        """Write :meth:`to_dict` as JSON to a local path or ``s3://`` URI (atomically)."""
        storage.write_json(uri, self.to_dict())

    @classmethod
    def from_json(cls, uri: str) -> RankResult:
        return cls.from_metrics(storage.read_json(uri))


def format_table(results: dict[str, RankResult]) -> str:
    """A fixed-width table, one row per result, values in percent (``mean±std`` for aggregated trials)."""
    cols = [f"R{k}" for k in TABLE_RANKS] + ["mAP", "mINP"]
    width = max([len("method")] + [len(label) for label in results])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for label, res in results.items():
        values = res.summary()
        std = res.std or {}
        cells = []
        for c in cols:
            s = _std_percent(std, c)
            cells.append(f"{values[c]:6.2f}±{s:5.2f}" if s is not None else f"{values[c]:12.2f}")
        lines.append(f"{label:<{width}}  " + "  ".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)


def _std_percent(std: dict, col: str) -> float | None:
    if not std:
        return None
    if col.startswith("R") and "cmc" in std:
        k = int(col[1:])
        cmc_std = np.asarray(std["cmc"])
        return 100 * float(cmc_std[k - 1]) if k <= len(cmc_std) else None
    return 100 * float(std[col]) if col in std else None


def plot_cmc(results: dict[str, RankResult | dict], uri: str, max_rank: int | None = None,
             title: str = "CMC") -> None:
    """Plot CMC curves (``{label: result}``) to a PNG at a local path or ``s3://`` URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results is empty; pass {label: RankResult or evaluate_rank dict}")
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    try:
        for label, res in results.items():
            r = res if isinstance(res, RankResult) else RankResult.from_metrics(res, label)
            cmc = r.cmc[:max_rank] if max_rank else r.cmc
            ranks = np.arange(1, len(cmc) + 1)
            ax.plot(ranks, 100 * cmc, label=f"{label} (R1 {100 * r.rank(1):.1f}, mAP {100 * r.mAP:.1f})")
        ax.set_xlabel("rank")
        ax.set_ylabel("matching rate (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
