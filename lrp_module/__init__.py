"""Layer-wise relevance propagation for torchvision VGG as explicit, exportable tensor code."""
from .composites import COMPOSITES, Composite, LayerInfo, get_composite
from .model import ExportableLRP, LRPModel
from .rules import AlphaBeta, AvgPoolRule, Epsilon, Flat, Gamma, Norm, WinnerTakesAll, WSquare, ZBox, ZPlus
from .topk import relevance_filter

__all__ = [
    "AlphaBeta", "AvgPoolRule", "COMPOSITES", "Composite", "Epsilon", "ExportableLRP", "Flat", "Gamma",
    "LRPModel", "LayerInfo", "Norm", "WSquare", "WinnerTakesAll", "ZBox", "ZPlus", "get_composite",
    "relevance_filter",
]
