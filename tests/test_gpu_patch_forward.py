"""The patch-staged forward (``schedules/cuda_patch_forward.py``) against the float64 reference on a real GPU
(``pytest -m gpu``) in float16, bfloat16 and TF32: a torchvision-style asymmetric layer (kernel 3 x 2,
stride (2, 1), padding (1, 0), dilation (2, 1), ragged tiles) with and without mask and bias, halos 0 (most
corners in overflow slots or on the global path) and 3, no overflow slots (every corner outside the
patch on the global path), normal and extreme offsets (far outside, infinite, NaN); a 1 x 1 layer
whose block fits static shared memory; and r50 c5 on its profile inputs. Columns interpolated into
registers (``columns="registers"``) on the same cases, giving the shared columns' output bit for
bit on the same tile; skipped where there is no GPU."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import pytest
import torch

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime.kernel_cache import ForwardCall
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules.cuda_patch_forward import PatchTiling, patch_forward_module
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case, with_extreme_offsets

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

PRECISIONS = ("float16", "bfloat16", "tf32")
HALOS = (0, 3)
LAYER = DeformConvSpec(2, 32, 11, 19, 64, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), layout="NHWC")
PLAIN = dataclasses.replace(LAYER, has_mask=False, has_bias=False)
POINTWISE = DeformConvSpec(2, 32, 9, 13, 64, 1, 1, stride=(2, 1), layout="NHWC", dtype="float16")  # static shared


def _spec(spec: DeformConvSpec, precision: str) -> DeformConvSpec:
    tf32 = precision == "tf32"
    return dataclasses.replace(spec, dtype="float32" if tf32 else precision, tf32=tf32, layout="NHWC")


def _tilings(spec: DeformConvSpec, **changes) -> tuple[PatchTiling, ...]:
    """``PatchTiling.for_spec(spec)`` with ``changes`` (columns in shared memory), the same tile with
    columns in registers (one warp per 16 positions), and the default of columns in registers."""
    shared = dataclasses.replace(PatchTiling.for_spec(spec), **changes)
    same_tile = dataclasses.replace(shared, columns="registers", warps_o=1, warps_p=shared.positions // 16)
    return tuple(dict.fromkeys((shared, same_tile,
                                dataclasses.replace(PatchTiling.for_spec(spec, columns="registers"), **changes))))


NO_SLOTS = {"halo": 0, "overflow": 0}  # every corner outside the patch on the global path


def _c5(precision: str):
    return get_workload("r50dcn_c5", "float32" if precision == "tf32" else precision, tf32=precision == "tf32")


SPLITS = {"k_splits": 2}  # split-K: partial sums, then their sum in order


def _jobs():
    cases = [(_spec(s, p), {"halo": h}) for s in (LAYER, PLAIN) for p in PRECISIONS for h in HALOS]
    cases += [(POINTWISE, {}), (_spec(LAYER, "float16"), NO_SLOTS)]
    cases += [(_spec(_c5(p).spec, p), {}) for p in PRECISIONS]
    cases += [(_spec(s, p), SPLITS) for s in (LAYER, PLAIN) for p in PRECISIONS]
    cases += [(_spec(_c5(p).spec, p), {"k_splits": 4}) for p in PRECISIONS]
    return [(spec, tiling) for spec, changes in cases for tiling in _tilings(spec, **changes)]


@pytest.fixture(scope="module")
def kernels():
    """Every kernel of the module, compiled in parallel (nvcc runs outside the GIL)."""
    target = target_for_device(torch.device("cuda"))
    jobs = _jobs()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        built = pool.map(lambda job: compile_kernel(patch_forward_module(*job), target)["forward"], jobs)
        return dict(zip(jobs, built))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def _check(kernels, spec: DeformConvSpec, case: dict, **changes) -> None:
    """``_tilings``' kernels match the reference, and on the same tile the columns in registers give
    the shared columns' bits (NaN included; on another tile the corners outside the patch may take
    the global path in another order, so another rounding)."""
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    reference = deform_conv2d_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                           for k, v in args.items()})
    outputs = []
    for tiling in _tilings(spec, **changes):
        out = ForwardCall(spec, kernels[(spec, tiling)], None).call(args["input"], args["offset"], args["mask"],
                                                                     args["weight"], args["bias"])
        assert out.dtype == args["input"].dtype and out.shape == reference.shape
        assert_close(out, reference, tolerance_key(spec.dtype, spec.tf32))
        outputs.append(out)
    assert torch.equal(_bits(outputs[0]), _bits(outputs[1]))


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize("layer", [LAYER, PLAIN], ids=["mask_bias", "plain"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_asymmetric_layer_matches_the_reference(kernels, precision, layer, halo, extreme):
    spec = _spec(layer, precision)
    case = make_case(spec, seed=21, offset_scale=3.0)
    if extreme:  # the reference's result, no out-of-bounds read
        case = with_extreme_offsets(case, 22)
    _check(kernels, spec, case, halo=halo)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
def test_every_corner_outside_the_patch_on_the_global_path_matches_the_reference(kernels, extreme):
    spec = _spec(LAYER, "float16")
    case = make_case(spec, seed=24, offset_scale=3.0)
    _check(kernels, spec, with_extreme_offsets(case, 22) if extreme else case, **NO_SLOTS)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
def test_a_layer_in_static_shared_memory_matches_the_reference(kernels, extreme):
    assert not any(tiling.dynamic(POINTWISE) for tiling in _tilings(POINTWISE))
    case = make_case(POINTWISE, seed=23, offset_scale=3.0)
    _check(kernels, POINTWISE, with_extreme_offsets(case, 22) if extreme else case)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_r50_c5_matches_the_reference(kernels, precision):
    workload = _c5(precision)
    spec = _spec(workload.spec, precision)
    _check(kernels, spec, workload.make_inputs(seed=3))


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
@pytest.mark.parametrize("layer", [LAYER, PLAIN], ids=["mask_bias", "plain"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_k_matches_the_reference(kernels, precision, layer, extreme):
    spec = _spec(layer, precision)
    case = make_case(spec, seed=25, offset_scale=3.0)
    _check(kernels, spec, with_extreme_offsets(case, 22) if extreme else case, **SPLITS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_r50_c5_split_four_ways_matches_the_reference(kernels, precision):
    workload = _c5(precision)
    spec = _spec(workload.spec, precision)
    _check(kernels, spec, workload.make_inputs(seed=3), k_splits=4)
