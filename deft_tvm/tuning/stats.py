"""Offset profiles: statistics of the sampling offsets that a model's deformable convolutions see.

``collect(model, batches)`` hooks every DCN layer of a model, runs it and returns a ``Profile``
(per-layer statistics, saved as versioned JSON). ``Profile.offset_profile()`` turns histograms into
an ``EmpiricalProfile`` that draws offsets and masks like ``OffsetProfile``;
``compare`` tabulates a profile against the synthetic ones; ``register_cli`` adds ``deft-tvm stats``.

A *sample* is one (dy, dx) pair: one batch element, offset group, kernel tap ``(ky, kx)`` and output
pixel ``(oy, ox)``. It reads the input at ``y = oy * stride_h - pad_h + ky * dil_h + dy`` (``x``
likewise) and is *outside* the image, contributing nothing, when ``y <= -1 or y >= H or x <= -1 or
x >= W`` (torchvision's rule; the mask is ignored). Its bilinear *footprint* is rows
``floor(y)..floor(y)+1`` and columns ``floor(x)..floor(x)+1``, clipped to the image. An output tile of
``tile_h x tile_w`` pixels covering rows ``[t * tile_h, (t + 1) * tile_h)`` has the input *patch*
rows ``[t * tile_h * stride_h - pad_h, ((t + 1) * tile_h - 1) * stride_h - pad_h + (kh - 1) * dil_h]``
(columns likewise); a sample is *covered with halo h* when its footprint lies inside the patch
grown by ``h`` on every side (an outside sample reads nothing, so it is always covered). Samples
with a non-finite dy, dx or mask are only counted (``nonfinite``).

The statistics of one layer (``Profile.layers[name]``, JSON-ready):
  ``spec``: the ``DeformConvSpec`` fields of its first call (``batch`` is that call's batch size),
  ``calls``, ``samples`` (finite samples), ``nonfinite``, ``quantile_samples`` (the size of the
  uniform random subset the quantiles come from), ``outside_fraction``,
  ``dy``, ``dx``, ``abs`` (``sqrt(dy^2 + dx^2)``) and ``mask`` (None without a mask): each
  ``{mean, std, min, max, quantiles: {levels, values}, histogram: {lo, bin_width, counts,
  underflow, overflow}}``, the mask also ``fraction_below_0.01``,
  ``tile_halo``: ``{halos: [0..8], covered: {"HxW": [samples covered with each halo]}}``.
Counters, moments and histograms are exact over all samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend.checks import as_pair, spec_from_tensors
from deft_tvm.frontend.modules import DeformConv2d, ModulatedDeformConv2dPack

FORMAT = "deft_tvm.offset_profile"
VERSION = 1
QUANTILE_LEVELS = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
TILES = ((1, 32), (2, 32), (4, 32), (4, 64), (8, 8), (8, 16), (16, 16))
HALOS = tuple(range(9))
SMALL_MASK = 0.01
SYNTHETIC = ("normal_0.5px", "normal_2px", "normal_8px", "student_t3_2px")


@dataclasses.dataclass(frozen=True)
class OffsetProfile:
    """A synthetic distribution of sampling offsets (pixels) and modulation masks.

    ``dy`` and ``dx`` are i.i.d. ``sigma * t(dof)`` (Student's t with an integer number of degrees
    of freedom; ``dof=None`` means normal), the mask is ``sigmoid`` of a standard normal.
    """

    name: str
    sigma: float
    dof: int | None = None

    def sample_offsets(self, shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        draws = torch.randn(shape, generator=generator, dtype=torch.float64)
        if self.dof is not None:
            chi2 = torch.randn((*shape, self.dof), generator=generator, dtype=torch.float64).square().sum(-1)
            draws = draws * (chi2 / self.dof).rsqrt()
        return (self.sigma * draws).to(dtype=dtype, device=device)

    def sample_mask(self, shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return _sigmoid_normal(shape, generator, dtype, device)


def _sigmoid_normal(shape, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """``sigmoid(N(0, 1))`` mask values of ``shape``, drawn on the CPU generator and moved to ``device``."""
    return torch.sigmoid(torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype=dtype, device=device)


PROFILES = {
    p.name: p
    for p in (
        OffsetProfile("normal_0.5px", 0.5),
        OffsetProfile("normal_2px", 2.0),
        OffsetProfile("normal_8px", 8.0),
        OffsetProfile("student_t3_2px", 2.0, dof=3),
    )
}


@functools.lru_cache(maxsize=64)
def offset_profile(name: str):
    """The offset distribution ``name`` names: a ``PROFILES`` key, or ``"PATH#LAYER[+LAYER...]"``,
    the recorded histograms of those layers of a model profile (``tuning.stats.Profile``, as
    ``deft-tvm stats`` and ``tune_model`` save it) pooled (``tuning.stats.EmpiricalProfile``).

    Raises:
        KeyError: ``name`` is neither, or the profile has no such layer.
        OSError, ValueError: PATH cannot be read as a profile (``tuning.stats.load_profile``).
    """
    if name in PROFILES:
        return PROFILES[name]
    path, sep, layers = name.rpartition("#")
    if not sep or not path or not layers:
        raise KeyError(f"unknown offset profile {name!r}; expected one of {', '.join(PROFILES)} or "
                       f"PATH.json#LAYER[+LAYER...] (a model profile's layers)")
    recorded = load_profile(path).layers
    missing = [layer for layer in layers.split("+") if layer not in recorded]
    if missing:
        raise KeyError(f"offset profile {name!r}: {path} has no layer {', '.join(map(repr, missing))}; "
                       f"its layers: {', '.join(recorded)}")
    return EmpiricalProfile.from_layers(name, [recorded[layer] for layer in layers.split("+")])


@dataclasses.dataclass(frozen=True)
class _Bins:
    """``count`` histogram bins of ``width`` starting at ``lo``, plus underflow and overflow."""

    lo: float
    width: float
    count: int

    def counts(self, values: torch.Tensor) -> list[int]:
        """``[underflow, bin 0, ..., bin count-1, overflow]`` of finite 1-D ``values``."""
        index = torch.floor((values - self.lo) / self.width).clamp(-1, self.count) + 1
        return torch.bincount(index.long(), minlength=self.count + 2).tolist()


_BINS = {
    "dy": _Bins(-32.0, 0.25, 256),
    "dx": _Bins(-32.0, 0.25, 256),
    "abs": _Bins(0.0, 0.25, 128),
    "mask": _Bins(0.0, 0.01, 100),
}


def _quantiles(values: torch.Tensor) -> list[float]:
    """Quantiles of 1-D ``values`` at ``QUANTILE_LEVELS``, linearly interpolated (numpy's default)."""
    ordered = values.to(torch.float64).sort().values
    pos = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64) * (ordered.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return (ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)).tolist()


class _Quantity:
    """Exact running count, mean, variance (Chan's merge), extremes and histogram of one scalar."""

    def __init__(self, bins: _Bins):
        self.bins = bins
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.hist = [0] * (bins.count + 2)

    def add(self, values: torch.Tensor) -> None:
        """Fold in finite float64 1-D ``values``."""
        n = values.numel()
        if n == 0:
            return
        mean = values.mean().item()
        m2 = (values - mean).square().sum().item()
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total
        self.min = min(self.min, values.min().item())
        self.max = max(self.max, values.max().item())
        self.hist = [a + b for a, b in zip(self.hist, self.bins.counts(values))]

    def summary(self, kept: torch.Tensor) -> dict:
        """JSON-ready statistics; quantiles from ``kept``, a uniform random subset of the values."""
        empty = self.n == 0
        return {
            "mean": None if empty else self.mean,
            "std": None if empty else math.sqrt(self.m2 / self.n),
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "quantiles": {"levels": list(QUANTILE_LEVELS), "values": None if empty else _quantiles(kept)},
            "histogram": {
                "lo": self.bins.lo,
                "bin_width": self.bins.width,
                "counts": self.hist[1:-1],
                "underflow": self.hist[0],
                "overflow": self.hist[-1],
            },
        }


class _Reservoir:
    """A uniform random subset, without replacement, of at most ``capacity`` rows seen so far.

    Every row gets a uniform random key and the rows with the ``capacity`` smallest keys are kept
    (bottom-k sampling), so memory stays ``O(capacity)`` however many calls there are.
    """

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.keys = torch.empty(0, dtype=torch.float64)
        self.rows: Optional[torch.Tensor] = None

    def add(self, rows: torch.Tensor) -> None:
        """``rows``: ``[n, columns]`` float32 on the CPU."""
        keys = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64)
        if self.rows is not None:
            keys, rows = torch.cat((self.keys, keys)), torch.cat((self.rows, rows))
        if keys.numel() > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows


def _grid(out_size: int, kernel: int, stride: int, pad: int, dilation: int) -> torch.Tensor:
    """Regular sampling positions ``[kernel, out_size]`` along one axis, float64."""
    out_pos = torch.arange(out_size, dtype=torch.float64) * stride - pad
    return (torch.arange(kernel, dtype=torch.float64) * dilation)[:, None] + out_pos[None, :]


def _patch(out_size: int, tile: int, kernel: int, stride: int, pad: int, dilation: int):
    """For each output row (or column): the first and last input row (column) of the patch of the
    tile of ``tile`` output rows (columns) it belongs to; two float64 tensors ``[out_size]``."""
    t = torch.arange(out_size, dtype=torch.float64).div(tile, rounding_mode="floor")
    first = t * tile * stride - pad
    last = ((t + 1) * tile - 1) * stride - pad + (kernel - 1) * dilation
    return first, last


def _covered_counts(spec: DeformConvSpec, y, x, finite, outside, tile: tuple[int, int]) -> list[int]:
    """Of the finite samples at sampling points ``y``, ``x`` (``[N, offset groups, kernel_h,
    kernel_w, out_h, out_w]`` float64; ``finite`` their mask, ``outside`` that of the finite ones
    outside the image), how many are covered with each halo of ``HALOS`` by the patches of
    ``tile`` (rows, columns) output tiles (module docstring)."""
    fy, fx = torch.floor(y), torch.floor(x)
    rows = fy.clamp(min=0), (fy + 1).clamp(max=spec.height - 1)
    cols = fx.clamp(min=0), (fx + 1).clamp(max=spec.width - 1)
    first_y, last_y = _patch(spec.out_h, tile[0], spec.kernel_h, spec.stride[0], spec.padding[0], spec.dilation[0])
    first_x, last_x = _patch(spec.out_w, tile[1], spec.kernel_w, spec.stride[1], spec.padding[1], spec.dilation[1])
    need = torch.maximum(
        torch.maximum(first_y[:, None] - rows[0], rows[1] - last_y[:, None]),
        torch.maximum(first_x - cols[0], cols[1] - last_x),
    )[finite]
    need = need.masked_fill(outside, 0).clamp(0, len(HALOS)).long()
    return torch.bincount(need, minlength=len(HALOS) + 1).cumsum(0)[: len(HALOS)].tolist()


def _offsets(spec: DeformConvSpec, offset: torch.Tensor):
    """``(dy, dx)`` of ``offset`` (``[N, 2 * offset groups * kernel_h * kernel_w, out_h, out_w]``,
    px), each ``[N, offset groups, kernel_h, kernel_w, out_h, out_w]`` float64 on the CPU."""
    n, og, kh, kw, oh, ow = spec.batch, spec.offset_groups, spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w
    off = offset.detach().to("cpu", torch.float64).reshape(n, og, kh, kw, 2, oh, ow)
    return off[:, :, :, :, 0], off[:, :, :, :, 1]


def _sampling_points(spec: DeformConvSpec, dy: torch.Tensor, dx: torch.Tensor):
    """``(y, x, outside)``: the input rows and columns the offsets ``dy``, ``dx`` (``_offsets``)
    sample, and where they are outside the image (module docstring)."""
    y = dy + _grid(spec.out_h, spec.kernel_h, spec.stride[0], spec.padding[0], spec.dilation[0])[:, None, :, None]
    x = dx + _grid(spec.out_w, spec.kernel_w, spec.stride[1], spec.padding[1], spec.dilation[1])[None, :, None, :]
    return y, x, (y <= -1) | (y >= spec.height) | (x <= -1) | (x >= spec.width)


def halo_coverage(spec: DeformConvSpec, offset: torch.Tensor, tile: tuple[int, int]) -> list[float]:
    """The fraction of the finite samples of ``offset`` (``[N, 2 * offset groups * kernel_h *
    kernel_w, out_h, out_w]``, px, any float dtype and device) covered with each halo of ``HALOS``
    (px) by the patches of ``tile`` (rows, columns) output tiles (module docstring; a sample
    outside the image counts as covered); 1.0 each where no sample is finite."""
    dy, dx = _offsets(spec, offset)
    y, x, outside = _sampling_points(spec, dy, dx)
    finite = y.isfinite() & x.isfinite()
    samples = int(finite.sum())
    counts = _covered_counts(spec, y, x, finite, outside[finite], tile)
    return [c / samples if samples else 1.0 for c in counts]


@functools.lru_cache(maxsize=256)
def profile_halo_coverage(spec: DeformConvSpec, profile: str, tile: tuple[int, int], seed: int = 0) -> tuple:
    """``halo_coverage`` of ``spec``'s offsets drawn from the offset profile ``profile``
    (``offset_profile``'s name; ``seed`` seeds the draw), as a tuple, cached."""
    generator = torch.Generator().manual_seed(seed)
    offset = offset_profile(profile).sample_offsets(spec.offset_shape, generator, torch.float64)
    return tuple(halo_coverage(spec, offset, tile))


def layer_spec(layer_stats: dict) -> DeformConvSpec:
    """The ``DeformConvSpec`` of a layer's first call, from its statistics."""
    return DeformConvSpec.from_dict(layer_stats["spec"])


class _LayerRecorder:
    """Accumulates the statistics of one DCN layer over its calls."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.spec: Optional[DeformConvSpec] = None
        self.calls = self.nonfinite = self.outside = 0
        self.quantities = {name: _Quantity(bins) for name, bins in _BINS.items()}
        self.small_mask = 0
        self.covered = {tile: [0] * len(HALOS) for tile in TILES}
        self.reservoir = _Reservoir(capacity, generator)

    def record(self, layer: nn.Module, input, offset, mask) -> None:
        """One call of ``layer`` (a DCN module) with torchvision's forward arguments."""
        stride, padding = as_pair(layer.stride, "stride"), as_pair(layer.padding, "padding")
        dilation = as_pair(layer.dilation, "dilation")
        spec = spec_from_tensors(input, offset, layer.weight, layer.bias, stride, padding, dilation, mask)
        if self.spec is None:
            self.spec = spec
        elif spec.has_mask != self.spec.has_mask:
            raise ValueError(
                f"a layer was called with has_mask={spec.has_mask} after has_mask={self.spec.has_mask}; "
                f"expected the same for every call"
            )
        self.calls += 1
        dy, dx = _offsets(spec, offset)  # [n, og, kh, kw, oh, ow]
        finite = dy.isfinite() & dx.isfinite()
        if mask is not None:
            mask = mask.detach().to("cpu", torch.float64).reshape(dy.shape)
            finite &= mask.isfinite()
        self.nonfinite += int((~finite).sum())
        y, x, outside = _sampling_points(spec, dy, dx)
        outside = outside[finite]
        self.outside += int(outside.sum())
        self._record_tiles(spec, y, x, finite, outside)

        dy, dx = dy[finite], dx[finite]
        magnitude = torch.sqrt(dy * dy + dx * dx)
        columns = [dy, dx, magnitude]
        for name, values in zip(("dy", "dx", "abs"), columns):
            self.quantities[name].add(values)
        if mask is not None:
            mask = mask[finite]
            self.quantities["mask"].add(mask)
            self.small_mask += int((mask < SMALL_MASK).sum())
            columns.append(mask)
        self.reservoir.add(torch.stack(columns, dim=1).to(torch.float32))

    def _record_tiles(self, spec, y, x, finite, outside) -> None:
        """Count, per tile shape, the finite samples covered with each halo."""
        for tile in TILES:
            covered = _covered_counts(spec, y, x, finite, outside, tile)
            self.covered[tile] = [a + b for a, b in zip(self.covered[tile], covered)]

    def summary(self) -> dict:
        kept = self.reservoir.rows
        samples = self.quantities["dy"].n
        stats = {
            "spec": self.spec.to_dict(),
            "calls": self.calls,
            "samples": samples,
            "nonfinite": self.nonfinite,
            "quantile_samples": kept.shape[0],
            "outside_fraction": self.outside / samples if samples else None,
        }
        for column, name in enumerate(("dy", "dx", "abs")):
            stats[name] = self.quantities[name].summary(kept[:, column])
        stats["mask"] = None
        if self.spec.has_mask:
            stats["mask"] = self.quantities["mask"].summary(kept[:, 3])
            stats["mask"][f"fraction_below_{SMALL_MASK}"] = self.small_mask / samples if samples else None
        stats["tile_halo"] = {
            "halos": list(HALOS),
            "covered": {f"{h}x{w}": counts for (h, w), counts in self.covered.items()},
        }
        return stats


def halo_for(layer_stats: dict, tile: tuple[int, int], target_fraction: float) -> Optional[int]:
    """The smallest halo (px) at which ``tile`` covers at least ``target_fraction`` of the layer's
    samples, or None when no halo in the table does."""
    if not 0 <= target_fraction <= 1:
        raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction}")
    table = layer_stats["tile_halo"]
    key = f"{tile[0]}x{tile[1]}"
    if key not in table["covered"]:
        raise KeyError(f"tile {key} is not in the table; tiles: {', '.join(table['covered'])}")
    samples = layer_stats["samples"]
    for halo, covered in zip(table["halos"], table["covered"][key]):
        if samples and covered / samples >= target_fraction:
            return halo
    return None


def profile_digest(name: str) -> str:
    """What a tuning database remembers of the offset distribution ``name`` names
    (``offset_profile``): a synthetic profile's name, or ``sha256:`` and 16 hex digits of a recorded
    one's pooled histograms (bins, counts, min, max), so the same statistics saved at another path
    are the same profile and other statistics saved at the same path are not.

    Raises: as ``offset_profile``.
    """
    profile = offset_profile(name)
    if isinstance(profile, OffsetProfile):
        return name
    fields = {field: dataclasses.asdict(histogram) if histogram is not None else None
              for field, histogram in (("dy", profile.dy), ("dx", profile.dx), ("mask", profile.mask))}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class _Histogram:
    """``counts`` = ``[underflow, bin 0, ..., overflow]`` over bins of ``width`` from ``lo``;
    ``min``/``max`` bound the underflow and overflow."""

    lo: float
    width: float
    counts: tuple[int, ...]
    min: float
    max: float

    @classmethod
    def pooled(cls, quantities: list[dict]) -> "_Histogram":
        """Sum the histograms of several ``dy``/``dx``/``mask`` summaries (same bins)."""
        bins = {(q["histogram"]["lo"], q["histogram"]["bin_width"], len(q["histogram"]["counts"])) for q in quantities}
        if len(bins) != 1:
            raise ValueError(f"histograms have different bins (lo, bin_width, count) {sorted(bins)}; expected one")
        counts = [0] * (len(quantities[0]["histogram"]["counts"]) + 2)
        for q in quantities:
            h = q["histogram"]
            counts = [a + b for a, b in zip(counts, [h["underflow"], *h["counts"], h["overflow"]])]
        if sum(counts) == 0:
            raise ValueError("the histograms hold no finite sample; expected at least one")
        found = [q for q in quantities if q["min"] is not None]
        lo, width, _ = bins.pop()
        return cls(lo, width, tuple(counts), min(q["min"] for q in found), max(q["max"] for q in found))

    def sample(self, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """``[count]`` float64 draws on ``device``: a bin by its count, then uniform within it; drawn
        where ``generator`` draws (the CPU, as ``OffsetProfile``'s: the same draws for any
        ``device``) and moved there."""
        on = generator.device
        if count == 0:
            return torch.empty(0, dtype=torch.float64, device=device)
        inner = len(self.counts) - 2
        hi = self.lo + inner * self.width
        edges = self.lo + self.width * torch.arange(inner, dtype=torch.float64, device=on)
        lower = torch.cat((torch.tensor([self.min], dtype=torch.float64, device=on), edges,
                           torch.tensor([hi], dtype=torch.float64, device=on)))
        widths = torch.full((inner + 2,), self.width, dtype=torch.float64, device=on)
        widths[0], widths[-1] = max(self.lo - self.min, 0.0), max(self.max - hi, 0.0)
        weights = torch.tensor(self.counts, dtype=torch.float64, device=on)
        pick = torch.multinomial(weights, count, replacement=True, generator=generator)
        draws = lower[pick] + widths[pick] * torch.rand(count, generator=generator, dtype=torch.float64, device=on)
        return draws.to(device)


@dataclasses.dataclass(frozen=True)
class EmpiricalProfile:
    """Offsets and masks drawn from recorded histograms; a drop-in for ``OffsetProfile``.

    dy and dx are drawn independently, each from its own histogram; the mask from the mask
    histogram, or ``sigmoid(N(0, 1))`` (as ``OffsetProfile``) when the layers had no mask.
    """

    name: str
    dy: _Histogram
    dx: _Histogram
    mask: Optional[_Histogram] = None

    @classmethod
    def from_layers(cls, name: str, layers: list[dict]) -> "EmpiricalProfile":
        """Pool the histograms of one or more layers' statistics."""
        masked = [layer["mask"] for layer in layers if layer["mask"] is not None]
        return cls(
            name,
            _Histogram.pooled([layer["dy"] for layer in layers]),
            _Histogram.pooled([layer["dx"] for layer in layers]),
            _Histogram.pooled(masked) if masked else None,
        )

    def sample_offsets(self, shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Offsets of ``shape``, (dy, dx) alternating along dim 1 (dim 0 for a 1-D shape), as in
        torchvision's ``[batch, 2 * offset_groups * kh * kw, out_h, out_w]``."""
        shape = tuple(shape)
        dim = 1 if len(shape) >= 2 else 0
        if not shape or shape[dim] % 2:
            raise ValueError(f"offset shape {shape} must have an even size along dim {dim}, the (dy, dx) pairs")
        half = shape[:dim] + (shape[dim] // 2,) + shape[dim + 1:]
        dy = self.dy.sample(math.prod(half), generator, device).reshape(half)
        dx = self.dx.sample(math.prod(half), generator, device).reshape(half)
        return torch.stack((dy, dx), dim=dim + 1).reshape(shape).to(dtype)

    def sample_mask(self, shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Mask values of ``shape``."""
        shape = tuple(shape)
        if self.mask is None:
            return _sigmoid_normal(shape, generator, dtype, device)
        return self.mask.sample(math.prod(shape), generator, device).reshape(shape).to(dtype)


@dataclasses.dataclass
class Profile:
    """Per-layer offset statistics (``layers``: module name -> statistics, see the module
    docstring) and a description of where they come from (``source``)."""

    source: str
    layers: dict[str, dict]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "source": self.source, "layers": self.layers}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def offset_profile(self, layer_name: Optional[str] = None) -> EmpiricalProfile:
        """An ``EmpiricalProfile`` of one layer, or of all layers pooled when ``layer_name`` is None."""
        if layer_name is None:
            return EmpiricalProfile.from_layers("empirical:all layers", list(self.layers.values()))
        if layer_name not in self.layers:
            raise KeyError(f"no layer {layer_name!r} in the profile; layers: {', '.join(self.layers)}")
        return EmpiricalProfile.from_layers(f"empirical:{layer_name}", [self.layers[layer_name]])


def load_profile(path) -> Profile:
    """Read a profile written by ``Profile.save``."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {data.get('version')!r}, expected {VERSION}")
    return Profile(data["source"], data["layers"])


def dcn_classes() -> tuple[type, ...]:
    """deft_tvm's ``DeformConv2d`` (so also ``ModulatedDeformConv2dPack``) and torchvision's, if importable."""
    try:
        from torchvision.ops import DeformConv2d as TorchvisionDeformConv2d
    except ImportError:
        return (DeformConv2d,)
    return (DeformConv2d, TorchvisionDeformConv2d)


def _attach(layer: nn.Module, recorder: _LayerRecorder):
    """Hook ``layer`` so that each call is recorded; returns the hook's handle."""
    if isinstance(layer, ModulatedDeformConv2dPack):
        def after_conv_offset(conv_offset, args, output):
            recorder.record(layer, args[0], *layer.split_conv_offset(output))

        return layer.conv_offset.register_forward_hook(after_conv_offset)

    def before_forward(module, args, kwargs):
        bound = {**dict(zip(("input", "offset", "mask"), args)), **kwargs}
        recorder.record(module, bound["input"], bound["offset"], bound.get("mask"))

    return layer.register_forward_pre_hook(before_forward, with_kwargs=True)


def collect(
    model: nn.Module,
    batches: Iterable,
    *,
    max_samples_per_layer: int = 2_000_000,
    seed: int = 0,
    source: Optional[str] = None,
) -> Profile:
    """Run ``model`` under ``torch.no_grad()`` on each batch (a tensor, or a tuple of positional
    arguments) and return the offset statistics of each of its DCN layers that was called.

    Quantiles come from a uniform random subset of at most ``max_samples_per_layer`` samples per
    layer, drawn with a generator seeded by ``seed``; everything else is exact. ``source``
    (default: a short description of the call) is stored in the profile.
    """
    if max_samples_per_layer < 1:
        raise ValueError(f"max_samples_per_layer must be >= 1, got {max_samples_per_layer}")
    classes = dcn_classes()
    layers = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, classes)]
    if not layers:
        looked_for = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in classes)
        raise ValueError(f"{type(model).__name__} has no deformable convolution layer; looked for {looked_for}")
    generator = torch.Generator().manual_seed(seed)
    recorders = {name: _LayerRecorder(max_samples_per_layer, generator) for name, _ in layers}
    handles = []
    count = 0
    try:
        for name, layer in layers:
            handles.append(_attach(layer, recorders[name]))
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    stats = {name: r.summary() for name, r in recorders.items() if r.calls}
    if not stats:
        raise ValueError(f"none of the DCN layers ({', '.join(recorders)}) was called in {count} batches")
    default_source = f"collect({type(model).__name__}, {count} batches, seed {seed})"
    return Profile(default_source if source is None else source, stats)


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    a, b = a.sort().values, b.sort().values
    points = torch.cat((a, b))
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


def compare(
    profile_or_layer: Union[Profile, dict, EmpiricalProfile],
    synthetic_names: tuple[str, ...] = SYNTHETIC,
    *,
    samples: int = 200_000,
    seed: int = 0,
) -> str:
    """A text table of the real offsets (a Profile's pooled layers, one layer's statistics or an
    EmpiricalProfile) against synthetic ``PROFILES``.

    Every row is computed the same way, from ``samples`` seeded (dy, dx) draws: the std of dy and
    dx, quantiles of ``|offset|`` and the Kolmogorov-Smirnov distance of dy and dx to the real draws.
    """
    if isinstance(profile_or_layer, Profile):
        real = profile_or_layer.offset_profile()
    elif isinstance(profile_or_layer, dict):
        real = EmpiricalProfile.from_layers("empirical:layer", [profile_or_layer])
    else:
        real = profile_or_layer
    unknown = [n for n in synthetic_names if n not in PROFILES]
    if unknown:
        raise KeyError(f"unknown synthetic profiles {unknown}; registered: {', '.join(PROFILES)}")

    def draw(profile) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return profile.sample_offsets((samples, 2), gen, dtype=torch.float64)

    reference = draw(real)
    header = f"{'profile':24s} {'std dy':>7s} {'std dx':>7s} {'q50|o|':>7s} {'q99|o|':>7s} {'q99.9|o|':>8s} " \
             f"{'KS dy':>6s} {'KS dx':>6s}"
    lines = [header]
    for name, offsets in [(real.name, reference)] + [(n, draw(PROFILES[n])) for n in synthetic_names]:
        magnitude = offsets.norm(dim=1)
        q = torch.quantile(magnitude, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)).tolist()
        ks = [_ks_distance(offsets[:, i], reference[:, i]) for i in (0, 1)]
        std = offsets.std(dim=0).tolist()
        lines.append(f"{name[:24]:24s} {std[0]:7.3f} {std[1]:7.3f} {q[0]:7.3f} {q[1]:7.3f} {q[2]:8.3f} "
                     f"{ks[0]:6.3f} {ks[1]:6.3f}")
    return "\n".join(lines)


def describe(profile: Profile, target_fraction: float = 0.99) -> str:
    """A per-layer text summary: spec, counts, dy/dx/|offset| spread, outside fraction, mask and the
    halo each tile needs to cover ``target_fraction`` of the samples."""
    lines = [f"source: {profile.source}"]
    for name, layer in profile.layers.items():
        q = dict(zip(layer["abs"]["quantiles"]["levels"], layer["abs"]["quantiles"]["values"] or []))
        lines.append(f"{name}: {layer_spec(layer).key()}")
        lines.append(f"  calls {layer['calls']}, samples {layer['samples']} (non-finite {layer['nonfinite']}), "
                     f"quantiles from {layer['quantile_samples']}")
        if not layer["samples"]:
            continue
        lines.append(f"  dy mean {layer['dy']['mean']:+.3f} std {layer['dy']['std']:.3f} | "
                     f"dx mean {layer['dx']['mean']:+.3f} std {layer['dx']['std']:.3f} | "
                     f"|o| q50 {q[0.5]:.3f} q99 {q[0.99]:.3f} q99.9 {q[0.999]:.3f} max {layer['abs']['max']:.3f}")
        mask = layer["mask"]
        mask_text = "no mask"
        if mask is not None:
            small = mask[f"fraction_below_{SMALL_MASK}"]
            mask_text = f"mask mean {mask['mean']:.3f} std {mask['std']:.3f}, < {SMALL_MASK}: {small:.1%}"
        lines.append(f"  outside the image {layer['outside_fraction']:.2%}; {mask_text}")
        halos = " ".join(f"{key}:{halo_for(layer, tuple(map(int, key.split('x'))), target_fraction)}"
                         for key in layer["tile_halo"]["covered"])
        lines.append(f"  halo (px) covering {target_fraction:.0%}: {halos}")
    return "\n".join(lines)
