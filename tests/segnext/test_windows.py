"""The sliding-window grid shared by the torch and ONNX runtimes (`segnext.windows`)."""

from __future__ import annotations

import subprocess
import sys

from segnext.windows import window_boxes


def test_boxes_step_by_stride_and_clamp_the_last_window_to_the_border():
    assert window_boxes(10, 7, (4, 5), (3, 3)) == [
        (0, 0, 4, 5), (0, 2, 4, 7),
        (3, 0, 7, 5), (3, 2, 7, 7),
        (6, 0, 10, 5), (6, 2, 10, 7),
    ]
    assert window_boxes(3, 4, (8, 8), (4, 4)) == [(0, 0, 3, 4)]  # one window, cut at the edge
    for y1, x1, y2, x2 in window_boxes(37, 53, (16, 24), (11, 16)):
        assert 0 <= y1 < y2 <= 37 and 0 <= x1 < x2 <= 53 and (y2 - y1, x2 - x1) == (16, 24)


def test_importing_the_grid_loads_no_torch():
    code = "import sys, segnext.windows; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
