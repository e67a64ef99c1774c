"""Verification: torchvision's forward and gradients in plain-torch float64, independent of the
TVM kernels, and the one per-dtype tolerance table the kernels are checked with."""
