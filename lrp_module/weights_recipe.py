"""The input recipe of the model zoo's weights (as torchvision's weight enums carry their transforms): resize the
short side to 256/224 of the crop, centre-crop, normalise with the ImageNet mean and std. It is torchvision's
recipe for its VGG and ResNet-18/34 weights, and vgg-shapes* were trained through it at 64 px (demo/train.py).
(torchvision's IMAGENET1K_V2 weights of the larger ResNets were evaluated with resize 232; the pipeline applies
256 to every model.) Beside the zoo, not in it, so that composites (the z^B box bounds) can import it without
importing torchvision's model builders."""
from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalised image's range, per channel: the bounds of the z^B (box) rule on the first layer
IMAGENET_LOW = tuple((0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
IMAGENET_HIGH = tuple((1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@dataclass(frozen=True)
class ImageRecipe:
    """Resize the short side to `resize` (bilinear, antialiased), centre-crop `crop`, normalise by mean / std."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def at_crop(self, size: int) -> ImageRecipe:
        """The same recipe for a `size` x `size` input: the resize keeps its ratio to the crop (256/224)."""
        return replace(self, resize=round(size * self.resize / self.crop), crop=size)


IMAGENET_RECIPE = ImageRecipe(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
