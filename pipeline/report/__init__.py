"""The audit report of a run (one self-contained index.html with pictures beside it) and single heat maps."""
from .build import build_report, write_heatmaps
from .heatmap import COLOUR_MAPS, DEFAULT_COLOUR_MAP
from .run_data import ReportError

__all__ = ["COLOUR_MAPS", "DEFAULT_COLOUR_MAP", "ReportError", "build_report", "write_heatmaps"]
