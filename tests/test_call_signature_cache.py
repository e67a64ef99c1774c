"""The eager call's per-signature caches: a repeated signature reuses its validated spec, a bad
one raises on every call, and a spec's cached hash never travels between processes."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend import checks

from helpers import make_case

SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3)
HYPER = (*SPEC.stride, *SPEC.padding, *SPEC.dilation)


def _tensors(case):
    return [case[k] for k in ("input", "offset", "weight", "bias", "mask")]


def test_a_repeated_signature_returns_the_validated_spec():
    case = make_case(SPEC)
    first = checks.tensors_spec(*_tensors(case), HYPER)
    assert first == SPEC
    again = make_case(SPEC, seed=1)  # other tensors, same shapes, dtypes and devices
    assert checks.tensors_spec(*_tensors(again), HYPER) is first
    wider = dataclasses.replace(SPEC, padding=(2, 1))  # another padding: another signature and spec
    other = checks.tensors_spec(*_tensors(make_case(wider)), (*wider.stride, *wider.padding, *wider.dilation))
    assert other == wider and other is not first


def test_a_bad_signature_raises_on_every_call():
    case = make_case(SPEC)
    case["mask"] = case["mask"][:, :-1]
    for _ in range(2):
        with pytest.raises(ValueError, match=r"mask has shape \(2, 17, 4, 10\), expected \(2, 18, 4, 10\)"):
            checks.tensors_spec(*_tensors(case), HYPER)


def test_spec_from_tensors_takes_pairs_and_checks_types():
    case = make_case(SPEC)
    assert checks.spec_from_tensors(*_tensors(case)[:4], SPEC.stride, SPEC.padding, SPEC.dilation,
                                    case["mask"]) is checks.tensors_spec(*_tensors(case), HYPER)
    with pytest.raises(TypeError, match=r"offset must be a torch.Tensor, got list"):
        checks.spec_from_tensors(case["input"], [0.0], case["weight"], None, (1, 1), (0, 0), (1, 1), None)


def test_spec_hash_is_the_fields_hash_and_is_not_pickled():
    spec = dataclasses.replace(SPEC, dtype="float16", layout="NHWC")
    assert hash(spec) == hash(tuple(getattr(spec, f.name) for f in dataclasses.fields(spec)))
    state = spec.__getstate__()
    assert "_hash" not in state and state["dtype"] == "float16"
    restored = pickle.loads(pickle.dumps(spec))
    assert restored == spec and hash(restored) == hash(spec) and {spec: 1}[restored] == 1
    assert {dataclasses.replace(spec, batch=3): 1}.get(spec) is None  # unequal specs miss
