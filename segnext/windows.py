"""The sliding-window grid, in plain Python: the one box arithmetic of both runtimes.

`segnext.inference.slide_logits` (torch) and the ONNX runtime
(`pipelines.inference.onnx_runtime`, numpy + onnxruntime, which must not import torch) slide
the same windows, so they share this function instead of each keeping a copy of the grid.
It lives in segnext/ because the grid is the model library's (mmsegmentation's) and segnext/
must not import pipelines/; it imports nothing, and `segnext/__init__` imports its public names
lazily, so `import segnext.windows` loads no torch.
"""

from __future__ import annotations


def window_boxes(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """The (y1, x1, y2, x2) crop boxes that cover a `height` x `width` image, row by row.

    Windows of `crop` (h, w) start every `stride` (h, w) pixels, the last one of each row and
    column clamped to the border (mmsegmentation's grid); a window larger than the image is
    cut at its bottom/right edge (y2 - y1 < crop height), the caller pads it back to `crop`.
    """
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            boxes.append((max(y2 - h_crop, 0), max(x2 - w_crop, 0), y2, x2))
    return boxes
