"""Dataset layouts -> image records (id, path, label, boxes)."""
from .layouts import LAYOUTS, Dataset, DatasetFiles, detect_layout, load_dataset, load_records
from .records import DatasetError, ImageRecord

__all__ = ["LAYOUTS", "Dataset", "DatasetError", "DatasetFiles", "ImageRecord", "detect_layout", "load_dataset",
           "load_records"]
