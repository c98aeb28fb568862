"""Evaluation: CMC/mAP/mINP (Market rules), dataset protocols, k-reciprocal re-ranking, result tables.

    from slsr_ray.evaluate import evaluate_rank, re_ranking_features, RankResult
    res = RankResult.from_metrics(evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids), "ours")
    print(res.table())
"""

from .metrics import (
    METRICS,
    check_distmat,
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
    pairwise_distance,
)
from .protocols import (
    aggregate_trials,
    evaluate_cuhk03_single_shot,
    evaluate_multi_query,
    evaluate_split,
    evaluate_viper,
    pool_multi_query,
    random_half_splits,
)
from .rerank import re_ranking, re_ranking_features
from .results import RankResult, format_table, plot_cmc

__all__ = [
    "METRICS",
    "RankResult",
    "aggregate_trials",
    "check_distmat",
    "compute_distance_matrix",
    "evaluate_cuhk03_single_shot",
    "evaluate_features",
    "evaluate_multi_query",
    "evaluate_rank",
    "evaluate_split",
    "evaluate_viper",
    "format_table",
    "pairwise_distance",
    "plot_cmc",
    "pool_multi_query",
    "random_half_splits",
    "re_ranking",
    "re_ranking_features",
]
