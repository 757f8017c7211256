"""Layer-wise relevance propagation for torchvision VGGs and ResNets (one graph engine) as explicit, exportable
tensor code."""
from .composites import COMPOSITES, Composite, LayerInfo, get_composite
from .graph import GraphError, Sum
from .model import ExportableLRP, Forward, LRPModel
from .rules import AlphaBeta, AvgPoolRule, Epsilon, Flat, Gamma, Norm, WinnerTakesAll, WSquare, ZBox, ZPlus
from .topk import relevance_filter

__all__ = [
    "AlphaBeta", "AvgPoolRule", "COMPOSITES", "Composite", "Epsilon", "ExportableLRP", "Flat", "Forward", "Gamma",
    "GraphError", "LRPModel", "LayerInfo", "Norm", "Sum", "WSquare", "WinnerTakesAll", "ZBox", "ZPlus",
    "get_composite", "relevance_filter",
]
