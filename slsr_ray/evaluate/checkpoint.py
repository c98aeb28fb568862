"""A trained checkpoint's metrics on query/gallery manifests, in-process (the sweep's validation
scorer, `slsr train`'s report): the same features and distance as the pipeline's evaluation."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from ..models.reid import load_model

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    table: pa.Table,
    height: int,
    width: int,
    feature: str = "pool",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Retrieval features of every row of ``table`` (in-process, for small sets), as the extract stage
    computes them (not normalised: the evaluation's ``metric`` decides)."""
    from ..data import read_image
    from ..transforms import build_test_transform

    transform = build_test_transform(height, width, norm=model.cfg.input_norm)
    paths = table["path"].to_pylist()
    model = model.to(device).eval()
    feats = []
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([transform(read_image(p)) for p in paths[i : i + batch_size]]).to(device)
        feats.append(model.extract(batch, feature=feature).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)


def evaluate_checkpoint(
    checkpoint_uri: str,
    query_table: pa.Table,
    gallery_table: pa.Table,
    feature: str = "pool",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_rank: int = 50,
    metric: str = "euclidean",
) -> dict:
    """Rank-k / mAP / mINP of a trained checkpoint on query/gallery manifests, with the same features
    and distance (``metric``, default the pipeline's ``evaluate.metric``) as the pipeline's evaluation.
    Returns rank1/5/10/20, mAP, mINP, num_valid_queries and the full cmc list."""
    from .metrics import evaluate_features  # the evaluation layer; imported lazily

    model, _, extra = load_model(checkpoint_uri, map_location=device)
    height, width = int(extra.get("height", 256)), int(extra.get("width", 128))
    qf = extract_features(model, query_table, height, width, feature, batch_size, device)
    gf = extract_features(model, gallery_table, height, width, feature, batch_size, device)
    res = evaluate_features(
        qf, gf,
        query_table["pid"].to_numpy(), gallery_table["pid"].to_numpy(),
        query_table["camid"].to_numpy(), gallery_table["camid"].to_numpy(),
        metric=metric, max_rank=min(max_rank, gallery_table.num_rows),
    )  # fmt: skip
    cmc = np.asarray(res["cmc"])
    out = {f"rank{r}": float(cmc[min(r, len(cmc)) - 1]) for r in (1, 5, 10, 20)}
    out.update(
        mAP=float(res["mAP"]),
        mINP=float(res["mINP"]),
        num_valid_queries=int(res["num_valid_queries"]),
        cmc=cmc.tolist(),
        feature=feature,
        metric=metric,
    )
    return out
