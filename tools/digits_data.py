"""Real offline images: scikit-learn's bundled handwritten digits on a square canvas, and seeded augmentation.

    images, labels = load_digits(canvas=32)  # [1797, 1, 32, 32] in [0, 1], [1797] in 0..9
    batch = augment(images[:64], torch.Generator().manual_seed(0))  # [64, 1, 32, 32]

The 1797 8x8 digits ship inside scikit-learn (``pip install scikit-learn``): nothing is downloaded.
Each digit is upsampled to 3/4 of the canvas and centred on it (24x24 on a 32x32 canvas); the
augmentation rotates, scales and shifts (by up to 1/8 of the canvas, 4 px on 32x32), so that a
deformable convolution's offsets have something to do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEG, SCALE_RANGE = 25.0, (0.85, 1.15)
MAX_SHIFT_FRACTION = 1 / 8  # of the canvas side
DIGIT_FRACTION = 3 / 4  # of the canvas side


def load_digits(canvas: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[1797, 1, canvas, canvas]`` float32 in [0, 1] (each digit upsampled to
    ``round(3/4 * canvas)`` pixels square and centred) and labels ``[1797]`` int64.

    Raises ImportError, saying ``pip install scikit-learn``, where scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError("the digits data set is scikit-learn's bundled copy (nothing is downloaded): "
                          "pip install scikit-learn") from err
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    size = round(DIGIT_FRACTION * canvas)
    before = (canvas - size) // 2
    after = canvas - size - before
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return F.pad(images, (before, after, before, after)), torch.tensor(digits.target)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and shift of square images ``[batch, channels, size, size]``, drawn
    from ``generator``; same shape, zeros fill the border."""
    n = images.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    max_shift = MAX_SHIFT_FRACTION * images.shape[-1]
    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * math.pi / 180
    scale = uniform(*SCALE_RANGE)
    shift = uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    half = images.shape[-1] / 2
    theta = torch.stack((torch.stack((cos, -sin, shift[0] / half), 1), torch.stack((sin, cos, shift[1] / half), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)
