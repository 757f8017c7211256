"""Dataset layouts -> image records (id, path, label, boxes)."""
from .layouts import LAYOUTS, detect_layout, load_records
from .records import DatasetError, ImageRecord

__all__ = ["LAYOUTS", "DatasetError", "ImageRecord", "detect_layout", "load_records"]
