"""Real offline images: scikit-learn's bundled handwritten digits on a square canvas, and seeded augmentation.

    images, labels = load_digits(canvas=32)  # [1797, 1, 32, 32] in [0, 1], [1797] in 0..9
    batch = augment(images[:64], torch.Generator().manual_seed(0))  # [64, 1, 32, 32]

The 1797 8x8 digits ship inside scikit-learn (``pip install scikit-learn``): nothing is downloaded.
Each digit is upsampled to 3/4 of the canvas and centred on it (24x24 on a 32x32 canvas); the
augmentation rotates, scales and shifts (by up to 1/8 of the canvas, 4 px on 32x32), so that a
deformable convolution's offsets have something to do. The canvas and the augmentation are
``deft_tvm.examples.digits``'s (which ships 360 of the digits and a network trained on the rest).
"""

from __future__ import annotations

import torch

from deft_tvm.examples.digits import MAX_ROTATION_DEG, MAX_SHIFT_FRACTION, SCALE_RANGE, augment, to_canvas

__all__ = ["MAX_ROTATION_DEG", "MAX_SHIFT_FRACTION", "SCALE_RANGE", "augment", "load_digits", "load_raw_digits",
           "to_canvas"]


def load_raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as they are: uint8 ``[1797, 8, 8]`` (0..16) and labels ``[1797]`` int64.

    Raises ImportError, saying ``pip install scikit-learn``, where scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError("the digits data set is scikit-learn's bundled copy (nothing is downloaded): "
                          "pip install scikit-learn") from err
    digits = sklearn_digits()
    return torch.tensor(digits.images, dtype=torch.uint8), torch.tensor(digits.target)


def load_digits(canvas: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[1797, 1, canvas, canvas]`` float32 in [0, 1] (each digit upsampled to
    ``round(3/4 * canvas)`` pixels square and centred) and labels ``[1797]`` int64.

    Raises ImportError, saying ``pip install scikit-learn``, where scikit-learn is missing.
    """
    raw, labels = load_raw_digits()
    return to_canvas(raw, canvas), labels
