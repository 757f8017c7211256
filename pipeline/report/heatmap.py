"""Relevance maps as pictures, zennit-style: a diverging colour map whose centre colour is zero, symmetric
normalisation (R / max|R| in [-1, 1], so equal positive and negative relevance get mirrored colours), and an
overlay of the map on the image it explains."""
from __future__ import annotations

from functools import cache

import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from PIL import Image

from ..errors import PipelineError

# Anchor colours along the normalised value mapped from [-1, 1] to [0, 1]; 0.5 (relevance zero) is the centre.
COLOUR_MAPS: dict[str, list[tuple[float, str]]] = {
    # negative: cyan -> blue -> black at zero -> red -> yellow -> white: positive
    "coldnhot": [(0.0, "#00ffff"), (0.25, "#0000ff"), (0.5, "#000000"), (2 / 3, "#ff0000"), (5 / 6, "#ffff00"),
                 (1.0, "#ffffff")],
    # negative: blue -> white at zero -> red: positive
    "bwr": [(0.0, "#0000ff"), (0.5, "#ffffff"), (1.0, "#ff0000")],
}
DEFAULT_COLOUR_MAP = "coldnhot"
LEVELS = 255  # odd: index 127 is exactly zero, and -x and x sit at mirrored indices
CENTRE = LEVELS // 2


class ColourMapError(PipelineError, ValueError):
    """An unknown colour map name."""


@cache
def lookup_table(name: str = DEFAULT_COLOUR_MAP) -> np.ndarray:
    """(LEVELS, 3) uint8 colours; index CENTRE is relevance zero."""
    if name not in COLOUR_MAPS:
        raise ColourMapError(f"unknown colour map {name!r} (known: {', '.join(COLOUR_MAPS)})")
    cmap = LinearSegmentedColormap.from_list(name, COLOUR_MAPS[name], N=LEVELS)
    table = (cmap(np.linspace(0.0, 1.0, LEVELS))[:, :3] * 255).round().astype(np.uint8)
    table.setflags(write=False)
    return table


def normalise(relevance: np.ndarray) -> np.ndarray:
    """R / max|R| in [-1, 1] as float32; an all-zero (or all-missing) map stays zero; NaN (no map) counts as 0."""
    values = np.nan_to_num(np.asarray(relevance, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.abs(values).max()) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def colour_indices(normalised: np.ndarray) -> np.ndarray:
    """Normalised values in [-1, 1] -> colour-table indices (0 .. LEVELS-1, zero at CENTRE, symmetric)."""
    return (CENTRE + np.rint(np.clip(normalised, -1.0, 1.0) * CENTRE)).astype(np.intp)


def heatmap(relevance: np.ndarray, cmap: str = DEFAULT_COLOUR_MAP) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 picture."""
    return lookup_table(cmap)[colour_indices(normalise(relevance))]


def heatmap_image(relevance: np.ndarray, cmap: str = DEFAULT_COLOUR_MAP) -> Image.Image:
    """The heat map as a palette image (one byte per pixel: the colour table has LEVELS entries), which PNG
    stores exactly and writes about three times faster than RGB."""
    indices = colour_indices(normalise(relevance)).astype(np.uint8)
    image = Image.fromarray(indices).convert("P")  # "L" -> "P" keeps the indices
    image.putpalette(lookup_table(cmap).tobytes())
    return image


def overlay(image: np.ndarray, relevance: np.ndarray, cmap: str = DEFAULT_COLOUR_MAP, strength: float = 0.85
            ) -> np.ndarray:
    """The heat map over a grey version of the image, opaque where |R| is large and clear where it is zero."""
    normalised = normalise(relevance)
    if image.shape[:2] != normalised.shape:
        raise ValueError(f"image {image.shape[:2]} and map {normalised.shape} differ in size")
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = (strength * np.sqrt(np.abs(normalised)))[..., None]
    colours = lookup_table(cmap)[colour_indices(normalised)].astype(np.float32)
    return (grey[..., None] * (1.0 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)


def colour_bar(cmap: str = DEFAULT_COLOUR_MAP, width: int = 255, height: int = 12) -> np.ndarray:
    """(height, width, 3) legend strip from -max|R| (left) through 0 (middle) to +max|R| (right)."""
    indices = colour_indices(np.linspace(-1.0, 1.0, width, dtype=np.float32))
    return np.repeat(lookup_table(cmap)[indices][None], height, axis=0)
