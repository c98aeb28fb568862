"""Image transforms for re-id training and testing (PIL RGB image in, float tensor CxHxW out).

Training follows the paper (section 5.2) and the LSRO/layumi baseline it builds on: resize, random
crop, random horizontal flip, ImageNet normalisation (zero-centred pixels) and random erasing
(Zhong et al. 2020). Two crop modes:

* ``crop="pad"`` (default, the re-id baselines' 256x128 recipe): resize to HxW, zero-pad 10 px, random
  crop HxW. Keeps the person's aspect ratio and is the fast default.
* ``crop="resize"`` (the paper's recipe): resize to 8/7 of the output size, random crop HxW. With
  ``height=width=224`` this is exactly the paper's "resize to 256x256, random crop 224x224".
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("pad", "resize")
# Pixel scaling, a property of the model (ModelConfig.input_norm, saved in its checkpoint): ``imagenet``
# standardises with the ImageNet statistics (torchvision's weights expect it), ``symmetric`` scales to
# [-1, 1] as the paper does (section 5.2).
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named input normalisation."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"input_norm must be one of {tuple(NORMALIZATIONS)}, got {name!r}")
    return NORMALIZATIONS[name]


def build_train_transform(
    height: int = 256, width: int = 128, erasing_p: float = 0.5, crop: str = "pad", pad: int = 10,
    norm: str = "imagenet",
) -> T.Compose:
    """Training augmentation: resize + random crop (``crop`` mode), flip, normalise, random erasing.

    ``erasing_p`` is the probability of erasing one random rectangle (0 disables it); erased pixels are
    set to 0, i.e. the mean pixel after normalisation.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if crop == "pad":
        geometry = [T.Resize((height, width)), T.Pad(pad), T.RandomCrop((height, width))]
    else:
        geometry = [T.Resize((round(height * 8 / 7), round(width * 8 / 7))), T.RandomCrop((height, width))]
    steps = [*geometry, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*normalization(norm))]
    if erasing_p > 0:
        steps.append(T.RandomErasing(p=erasing_p, value=0))
    return T.Compose(steps)


def build_test_transform(height: int = 256, width: int = 128, norm: str = "imagenet") -> T.Compose:
    """Deterministic test transform: resize to HxW, normalise."""
    return T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(*normalization(norm))])
