"""benchmarks/detector_breakdown.py on the demo's detectors: every part is timed where it exists, and only there.

Never asserts on time beyond "a part is inside its whole".
"""
from __future__ import annotations

import pytest

from dcnv2.ops._native import HAS_NATIVE
from test_bench_deform_conv import load_module

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_breakdown_times_each_part_of_both_detectors(channels_last):
    bd = load_module("detector_breakdown")
    best = bd.breakdown("demo", repeats=1, channels_last=channels_last)
    regular, deformable = (best[p] for p in bd.inference.PRESETS)
    for parts in (regular, deformable):
        assert parts[bd.CONVS] > 0 and parts[bd.POOL] > 0 and parts[bd.HEAD] > 0
        assert parts[bd.CONVS] + parts[bd.POOL] + parts[bd.HEAD] < parts[bd.TOTAL]
    # the offset convs and the offset fc branch exist in the deformable detector only, inside their parts
    assert regular[bd.OFFSET_CONVS] == 0 and regular[bd.OFFSET_FC] == 0
    assert 0 < deformable[bd.OFFSET_CONVS] < deformable[bd.CONVS]
    assert 0 < deformable[bd.OFFSET_FC] < deformable[bd.POOL]
    lines = bd.table(best)
    assert len(lines) == 2 + len(bd.PARTS) and all(line.count("|") == 6 for line in lines)
