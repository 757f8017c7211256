"""The LRP rules, one module per rule: each states its formula once (its general path, as zennit 1.0 computes it)
and keeps its fast paths beside it, each with the predicate that makes it exact (lrp_module/contexts.py says what
the engine proves; docs/lrp-rules.md tabulates rule, formula, paper, paths and tests)."""
from ..contexts import LayerContext
from ..ops import PoolGeometry, adaptive_pool_matrix, sum_pool_transpose
from .alpha_beta import AlphaBeta, AlphaBetaGeneral, AlphaBetaNonnegative
from .base import NOTHING, BoundRule, Keep, Path, Rule, Stash
from .epsilon import Epsilon, EpsilonFromForward, EpsilonGeneral, EpsilonOnActive
from .flat import Flat, SquaredOrFlatGeneral, WSquare
from .gamma import Gamma, GammaFromOutput, GammaGeneral, GammaOnActive
from .pooling import (
    AdaptiveAveragePoolGeneral,
    AveragePoolGeneral,
    AvgPoolRule,
    BoundPoolRule,
    Norm,
    PoolRule,
    SumNormGeneral,
    SumNormOnActive,
    WinnerTakesAll,
    WinnerTakesAllGeneral,
)
from .zbox import ZBox, ZBoxGeneral
from .zplus import ZPlus, ZPlusGeneral, ZPlusNonnegative, ZPlusOnesInput

__all__ = [
    "NOTHING", "AdaptiveAveragePoolGeneral", "AlphaBeta", "AlphaBetaGeneral", "AlphaBetaNonnegative",
    "AveragePoolGeneral", "AvgPoolRule", "BoundPoolRule", "BoundRule", "Epsilon", "EpsilonFromForward",
    "EpsilonGeneral", "EpsilonOnActive", "Flat", "Gamma", "GammaFromOutput", "GammaGeneral", "GammaOnActive", "Keep",
    "LayerContext", "Norm", "Path", "PoolGeometry", "PoolRule", "Rule", "SquaredOrFlatGeneral", "Stash",
    "SumNormGeneral", "SumNormOnActive", "WSquare", "WinnerTakesAll", "WinnerTakesAllGeneral", "ZBox",
    "ZBoxGeneral", "ZPlus", "ZPlusGeneral", "ZPlusNonnegative", "ZPlusOnesInput", "adaptive_pool_matrix",
    "sum_pool_transpose",
]
