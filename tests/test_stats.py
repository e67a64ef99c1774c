"""Offset profiles: statistics against known distributions and brute force, JSON, sampling, hooks, CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

import deft_tvm
from deft_tvm.cli import stats as stats_cli
from deft_tvm.tuning import stats

# Most tests run one layer shape (3x3, padding 1, with a mask) so that one kernel is compiled.
SHAPE = (4, 2, 16, 16)
OFFSET_SHAPE = (4, 18, 16, 16)
MASK_SHAPE = (4, 9, 16, 16)
SAMPLES_PER_CALL = 4 * 9 * 16 * 16


class Explicit(nn.Module):
    """A ``DeformConv2d`` fed with given offsets: ``forward(input, offset, mask)`` -> its output."""

    def __init__(self, layer: deft_tvm.DeformConv2d):
        super().__init__()
        self.dcn = layer

    def forward(self, input, offset, mask=None):
        return self.dcn(input, offset, mask=mask)


class Both(nn.Module):
    """An explicit-offset layer and a ``ModulatedDeformConv2dPack`` on the same input, summed."""

    def __init__(self):
        super().__init__()
        self.explicit = Explicit(deft_tvm.DeformConv2d(2, 2, 3, padding=1))
        self.pack = deft_tvm.ModulatedDeformConv2dPack(2, 2, 3, padding=1)

    def forward(self, input, offset, mask):
        return self.explicit(input, offset, mask) + self.pack(input)


def pack_model() -> nn.Module:
    """1x1 conv -> ModulatedDeformConv2dPack with non-zero offsets, for the CLI test (``--model``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), deft_tvm.ModulatedDeformConv2dPack(2, 2, 3, padding=1))
    nn.init.normal_(model[1].conv_offset.weight, std=0.5)
    return model


def explicit_batches(calls: int, dy, dx, seed: int = 0):
    """``calls`` batches (input, offset, mask) of SHAPE; ``dy(gen, shape)``/``dx(gen, shape)`` draw the
    offsets, the mask is uniform on [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    half = (OFFSET_SHAPE[0], OFFSET_SHAPE[1] // 2, *OFFSET_SHAPE[2:])
    for _ in range(calls):
        offset = torch.stack((dy(gen, half), dx(gen, half)), dim=2).reshape(OFFSET_SHAPE)
        yield torch.randn(SHAPE, generator=gen), offset, torch.rand(MASK_SHAPE, generator=gen)


def normal(sigma, mean=0.0):
    return lambda gen, shape: mean + sigma * torch.randn(shape, generator=gen)


def normal_cdf(x, sigma):
    return 0.5 * (1 + math.erf(x / (sigma * math.sqrt(2))))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_moments_and_quantiles_match_the_generating_distribution():
    sigma, calls, kept = 1.5, 10, 20_000
    profile = stats.collect(Explicit(deft_tvm.DeformConv2d(2, 2, 3, padding=1)),
                            explicit_batches(calls, normal(sigma), normal(sigma)), max_samples_per_layer=kept)
    layer = profile.layers["dcn"]
    n = calls * SAMPLES_PER_CALL
    assert (layer["calls"], layer["samples"], layer["nonfinite"], layer["quantile_samples"]) == (calls, n, 0, kept)
    assert layer["spec"]["batch"] == 4 and layer["spec"]["has_mask"] and stats.layer_spec(layer).out_h == 16
    for name in ("dy", "dx", "abs", "mask"):
        h = layer[name]["histogram"]
        assert sum(h["counts"]) + h["underflow"] + h["overflow"] == n  # histograms are exact, not subsampled
    # Mean and std of n normal draws: standard errors sigma / sqrt(n) and sigma / sqrt(2 n); allow 5 of them.
    for name in ("dy", "dx"):
        assert abs(layer[name]["mean"]) < 5 * sigma / math.sqrt(n)
        assert layer[name]["std"] == pytest.approx(sigma, abs=5 * sigma / math.sqrt(2 * n))
    # The p-quantile of m i.i.d. draws sits where the true CDF is p +- sqrt(p (1 - p) / m); allow 5 of them.
    cdfs = {
        "dy": lambda q: normal_cdf(q, sigma),
        "dx": lambda q: normal_cdf(q, sigma),
        "abs": lambda q: 1 - math.exp(-q * q / (2 * sigma * sigma)),  # Rayleigh
        "mask": lambda q: q,  # uniform
    }
    for name, cdf in cdfs.items():
        quantiles = layer[name]["quantiles"]
        for p, q in zip(quantiles["levels"], quantiles["values"]):
            assert abs(cdf(q) - p) < 5 * math.sqrt(p * (1 - p) / kept) + 1 / kept, (name, p, q)
    assert layer["mask"]["mean"] == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / n))
    assert layer["mask"]["fraction_below_0.01"] == pytest.approx(0.01, abs=5 * math.sqrt(0.01 * 0.99 / n))


ASYMMETRIC = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1))


def brute_force(offset, height, width, tiles, halos):
    """Sample-by-sample: (dy values, outside count, {tile: [covered count per halo]}, boundary hits) for
    the ASYMMETRIC layer, straight from the definitions in deft_tvm.tuning.stats' docstring."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (ASYMMETRIC[k] for k in ("kernel_size", "stride", "padding", "dilation"))
    batch, channels, out_h, out_w = offset.shape
    groups = channels // (2 * kh * kw)
    dys, outside, boundary = [], 0, 0
    covered = {tile: [0] * len(halos) for tile in tiles}
    for n in range(batch):
        for g in range(groups):
            for ky in range(kh):
                for kx in range(kw):
                    channel = g * 2 * kh * kw + 2 * (ky * kw + kx)
                    for oy in range(out_h):
                        for ox in range(out_w):
                            dy, dx = offset[n, channel, oy, ox].item(), offset[n, channel + 1, oy, ox].item()
                            y, x = oy * sh - ph + ky * dh + dy, ox * sw - pw + kx * dw + dx
                            dys.append(dy)
                            boundary += y in (-1, height - 1, height) or x in (-1, width - 1, width)
                            out = y <= -1 or y >= height or x <= -1 or x >= width
                            outside += out
                            footprint = [] if out else [
                                (r, c)
                                for r in (math.floor(y), math.floor(y) + 1) for c in (math.floor(x), math.floor(x) + 1)
                                if 0 <= r < height and 0 <= c < width
                            ]
                            for th, tw in tiles:
                                ty, tx = oy // th, ox // tw
                                top, bottom = ty * th * sh - ph, ((ty + 1) * th - 1) * sh - ph + (kh - 1) * dh
                                left, right = tx * tw * sw - pw, ((tx + 1) * tw - 1) * sw - pw + (kw - 1) * dw
                                for i, h in enumerate(halos):
                                    covered[(th, tw)][i] += all(
                                        top - h <= r <= bottom + h and left - h <= c <= right + h for r, c in footprint
                                    )
    return dys, outside, covered, boundary


@pytest.fixture(scope="module")
def asymmetric():
    """(layer statistics, offset, input height, width) of one DCNv1 call of the ASYMMETRIC layer:
    input [1, 2, 7, 10], 2 offset groups, output 3x9, quarter-pixel offsets ~ N(0, 3) so that samples
    land exactly on the image borders."""
    gen = torch.Generator().manual_seed(3)
    offset = torch.round(torch.randn((1, 24, 3, 9), generator=gen) * 12) / 4
    model = Explicit(deft_tvm.DeformConv2d(2, 2, **ASYMMETRIC))
    profile = stats.collect(model, [(torch.randn((1, 2, 7, 10), generator=gen), offset)])
    return profile.layers["dcn"], offset, 7, 10


def test_outside_fraction_histogram_and_tile_halo_match_brute_force(asymmetric):
    layer, offset, height, width = asymmetric
    dys, outside, covered, boundary = brute_force(offset, height, width, stats.TILES, stats.HALOS)
    assert boundary > 0 and 0 < outside < len(dys)  # the case exercises the borders
    assert layer["spec"]["offset_groups"] == 2 and not layer["spec"]["has_mask"] and layer["mask"] is None
    assert layer["samples"] == len(dys) == 1 * 2 * 6 * 3 * 9
    assert layer["outside_fraction"] == outside / len(dys)
    expected_counts = [0] * 256
    for dy in dys:
        expected_counts[math.floor((dy + 32) / 0.25)] += 1
    assert layer["dy"]["histogram"]["counts"] == expected_counts
    assert layer["tile_halo"]["halos"] == list(stats.HALOS)
    assert layer["tile_halo"]["covered"] == {f"{h}x{w}": counts for (h, w), counts in covered.items()}
    assert len({tuple(c) for c in covered.values()}) > 1  # tile shapes differ on this case
    for tile, counts in covered.items():
        for target in (0.5, 0.9, 0.99, 1.0):
            expected = next((h for h, c in zip(stats.HALOS, counts) if c / len(dys) >= target), None)
            assert stats.halo_for(layer, tile, target) == expected


def test_halo_coverage_of_an_offset_tensor_matches_brute_force(asymmetric):
    """``stats.halo_coverage``: per halo, the fraction of the samples the patches of a tile shape
    cover (outside samples included), as the brute force counts them; 1.0 where no sample is finite."""
    layer, offset, height, width = asymmetric
    spec = stats.layer_spec(layer)
    dys, _, covered, _ = brute_force(offset, height, width, stats.TILES, stats.HALOS)
    for tile, counts in covered.items():
        assert stats.halo_coverage(spec, offset, tile) == [c / len(dys) for c in counts]
    assert stats.halo_coverage(spec, torch.full_like(offset, float("nan")), (8, 8)) == [1.0] * len(stats.HALOS)


def test_halo_for_rejects_unknown_tiles_and_fractions(asymmetric):
    layer = asymmetric[0]
    with pytest.raises(KeyError, match=r"tile 3x3 is not in the table; tiles: 1x32, 2x32"):
        stats.halo_for(layer, (3, 3), 0.9)
    with pytest.raises(ValueError, match=r"target_fraction must be in \[0, 1\], got 1.5"):
        stats.halo_for(layer, (8, 8), 1.5)


def test_pack_layer_offsets_and_mask_are_recorded():
    layer = deft_tvm.ModulatedDeformConv2dPack(2, 2, 3, padding=1).eval()
    with torch.no_grad():  # constant offsets: dy 10.25, dx -0.5 for every tap; mask logits 0 -> mask 0.5
        layer.conv_offset.bias.copy_(torch.tensor([10.25, -0.5] * 9 + [0.0] * 9))
    batches = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    recorded = stats.collect(nn.Sequential(layer), batches).layers["0"]
    assert recorded["calls"] == 2 and recorded["samples"] == 2 * SAMPLES_PER_CALL
    for name, value in (("dy", 10.25), ("dx", -0.5), ("mask", 0.5)):
        assert recorded[name]["min"] == recorded[name]["max"] == pytest.approx(value)
        assert recorded[name]["quantiles"]["values"] == pytest.approx([value] * len(stats.QUANTILE_LEVELS))
    # Output row 0 samples input rows 9..12 while its 1-row tile's patch is rows -1..1: no halo <= 8 covers it.
    assert stats.halo_for(recorded, (1, 32), 1.0) is None
    assert stats.halo_for(recorded, (16, 16), 1.0) == 0  # one tile covers the whole 16x16 image


@pytest.fixture(scope="module")
def heavy_profile():
    """dy ~ N(0, 1.5) but 2 % of draws +-U(33, 48) px, beyond the histogram; dx ~ U(-1, 5); all samples kept."""
    def dy(gen, shape):
        far = torch.sign(torch.randn(shape, generator=gen)) * (33 + 15 * torch.rand(shape, generator=gen))
        return torch.where(torch.rand(shape, generator=gen) < 0.02, far, 1.5 * torch.randn(shape, generator=gen))

    def dx(gen, shape):
        return -1 + 6 * torch.rand(shape, generator=gen)

    return stats.collect(Explicit(deft_tvm.DeformConv2d(2, 2, 3, padding=1)), explicit_batches(6, dy, dx, seed=1))


def test_empirical_profile_is_seeded_and_reproduces_the_histograms(heavy_profile):
    layer = heavy_profile.layers["dcn"]
    assert layer["quantile_samples"] == layer["samples"]  # quantiles are exact here
    empirical = heavy_profile.offset_profile("dcn")
    shape = (64, 18, 32, 32)
    draw = empirical.sample_offsets(shape, torch.Generator().manual_seed(7))
    assert draw.shape == shape and draw.dtype == torch.float32
    assert torch.equal(draw, empirical.sample_offsets(shape, torch.Generator().manual_seed(7)))
    assert not torch.equal(draw, empirical.sample_offsets(shape, torch.Generator().manual_seed(8)))
    assert torch.equal(empirical.sample_offsets(shape, torch.Generator().manual_seed(7)),
                       heavy_profile.offset_profile().sample_offsets(shape, torch.Generator().manual_seed(7)))
    dy, dx = draw[:, 0::2].double().flatten(), draw[:, 1::2].double().flatten()
    levels = torch.tensor(stats.QUANTILE_LEVELS[2:-2], dtype=torch.float64)  # 0.05 .. 0.95
    for name, values in (("dy", dy), ("dx", dx)):
        recorded = torch.tensor(layer[name]["quantiles"]["values"][2:-2], dtype=torch.float64)
        # Uniform within a 0.25 px bin moves a quantile by less than a bin; 1.2 M draws add ~0.01 px.
        assert torch.allclose(torch.quantile(values, levels), recorded, atol=0.25 + 0.03, rtol=0), name
    h = layer["dy"]["histogram"]
    far = (dy.abs() > 32).double().mean().item()
    assert far == pytest.approx((h["underflow"] + h["overflow"]) / layer["samples"], abs=0.003)
    # Underflow and overflow draws are uniform on [min, -32) and [32, max].
    assert layer["dy"]["min"] <= dy.min() < layer["dy"]["min"] + 0.1 and -32.1 < dy[dy < -32].max() < -32
    assert layer["dy"]["max"] >= dy.max() > layer["dy"]["max"] - 0.1 and 32 <= dy[dy > 32].min() < 32.1
    assert -1 <= dx.min() and dx.max() < 5  # dx ~ U(-1, 5): the occupied bins span [-1, 5)


def test_empirical_mask_follows_the_histogram_or_the_synthetic_default(heavy_profile):
    empirical = heavy_profile.offset_profile()
    mask = empirical.sample_mask((500_000,), torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(mask, empirical.sample_mask((500_000,), torch.Generator().manual_seed(1), dtype=torch.float64))
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert torch.allclose(torch.quantile(mask, levels), levels, atol=0.01 + 0.005, rtol=0)  # U(0, 1), 0.01 bins
    unmasked = copy.deepcopy(heavy_profile.layers["dcn"])
    unmasked["mask"] = None
    default = stats.EmpiricalProfile.from_layers("no mask", [unmasked]).sample_mask((100_000,), torch.Generator())
    assert 0 < default.min() and default.max() < 1 and default.median().item() == pytest.approx(0.5, abs=0.01)


def test_empirical_offsets_need_pairs(heavy_profile):
    with pytest.raises(ValueError, match=r"offset shape \(2, 9, 4, 4\) must have an even size along dim 1"):
        heavy_profile.offset_profile().sample_offsets((2, 9, 4, 4), torch.Generator())


def test_compare_tells_the_matching_synthetic_profile():
    profile = stats.collect(Explicit(deft_tvm.DeformConv2d(2, 2, 3, padding=1)),
                            explicit_batches(4, normal(2.0), normal(2.0), seed=2))
    rows = {line.split()[0]: line.split()[1:] for line in stats.compare(profile).splitlines()[1:]}
    assert set(rows) == {"empirical:all", *stats.SYNTHETIC}
    ks_dy = {name: float(values[-2]) for name, values in rows.items()}
    # Real offsets are N(0, 2): close to normal_2px (sampling noise ~0.01), far from N(0, 0.5) and N(0, 8).
    assert ks_dy["normal_2px"] < 0.03
    assert min(ks_dy["normal_0.5px"], ks_dy["normal_8px"]) > 0.2


def test_json_round_trip(tmp_path, asymmetric, heavy_profile):
    profile = stats.Profile("test data", {"a": asymmetric[0], "b": heavy_profile.layers["dcn"]})
    path = profile.save(tmp_path / "sub" / "profile.json")
    data = json.loads(path.read_text())
    assert (data["format"], data["version"], data["source"]) == ("deft_tvm.offset_profile", 1, "test data")
    loaded = stats.load_profile(path)
    assert loaded == profile
    shape = (2, 24, 3, 9)
    assert torch.equal(loaded.offset_profile().sample_offsets(shape, torch.Generator().manual_seed(0)),
                       profile.offset_profile().sample_offsets(shape, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, r"format 'other', expected 'deft_tvm.offset_profile'"),
    ({"version": 2}, r"deft_tvm.offset_profile version 2, expected 1"),
])
def test_load_rejects_other_formats_and_versions(tmp_path, change, message):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**stats.Profile("x", {}).to_json(), **change}))
    with pytest.raises(ValueError, match=message):
        stats.load_profile(path)


def test_model_without_dcn_layer_is_an_error():
    with pytest.raises(ValueError, match=r"Sequential has no deformable convolution layer; looked for deft_tvm"):
        stats.collect(nn.Sequential(nn.Conv2d(2, 2, 3)), [torch.randn(1, 2, 8, 8)])


def test_hooks_are_removed_after_collect_and_after_an_error():
    model = Both()
    batches = list(explicit_batches(1, normal(1.0), normal(1.0)))
    profile = stats.collect(model, batches)
    assert set(profile.layers) == {"explicit.dcn", "pack"} and hooks(model) == 0
    x, offset, mask = batches[0]
    with pytest.raises(ValueError, match=r"offset has shape"):
        stats.collect(model, [(x, offset[:, :, :8], mask)])
    assert hooks(model) == 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft-tvm")
    stats_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_records_and_shows_a_profile(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = make_parser().parse_args(["stats", "--model", "test_stats:pack_model", "--input-shape", "4", "2", "16", "16",
                                     "--batches", "2", "--out", str(out)])
    assert args.func(args) == 0
    profile = stats.load_profile(out)
    assert list(profile.layers) == ["1"] and profile.layers["1"]["calls"] == 2
    assert "--model test_stats:pack_model" in profile.source
    assert profile.layers["1"]["dy"]["std"] > 0.1  # the seeded conv_offset weights move the samples
    args = make_parser().parse_args(["stats", "--show", str(out)])
    capsys.readouterr()
    assert args.func(args) == 0
    shown = capsys.readouterr().out
    assert "1: n4_c2_h16_w16_o2_k3x3" in shown and "halo (px) covering 99%" in shown and "student_t3_2px" in shown


def test_cli_model_needs_shape_and_output(capsys):
    args = make_parser().parse_args(["stats", "--model", "test_stats:pack_model"])
    with pytest.raises(SystemExit):
        args.func(args)
    assert "--model needs --input-shape and --out" in capsys.readouterr().err
