"""``tools/host_overhead.py`` on the CPU: every provider reported, forward and forward+backward, one
input size or a new one per call."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.mark.parametrize("backward, new_sizes, providers", [
    (False, False, ["deft_tvm.deform_conv2d", "compiled kernel alone", "dense conv2d"]),
    (True, False, ["deft_tvm.deform_conv2d", "dense conv2d", "deft_tvm custom op"]),
    (True, True, ["deft_tvm.deform_conv2d", "dense conv2d", "deft_tvm custom op"]),
])
def test_reports_each_provider_once(backward, new_sizes, providers, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TOOLS))
    monkeypatch.delitem(sys.modules, "host_overhead", raising=False)
    import host_overhead

    host_overhead.main(["--calls", "2", *(["--backward"] if backward else []), *(["--new-sizes"] if new_sizes else [])])
    lines = capsys.readouterr().out.splitlines()
    heading = "forward and backward" if backward else "forward"
    heading += ", every call a new input size" if new_sizes else ""
    assert lines[0].endswith(heading)
    rows = [re.fullmatch(r"(.+?) +host +([\d.]+) us per call, with the device +([\d.]+) us per call", l) for l in lines[1:]]
    assert [r.group(1) for r in rows] == providers
    assert all(0 < float(r.group(2)) <= float(r.group(3)) for r in rows)
