"""One sample as tar members: the encoded image (JPEG re-encoded or PNG), its 8-bit mask PNG
and a JSON record of its sources and size, plus its class pixel counts for the manifest."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.manifest import JSON_MEMBER, MASK_MEMBER
from data.sources.base import Sample, Source


@dataclass(frozen=True)
class EncodeOptions:
    image_format: str = "jpg"  # "jpg" (re-encoded) or "png" (lossless)
    jpeg_quality: int = 95


def encode_sample(
    source: Source, sample: Sample, options: EncodeOptions
) -> tuple[dict[str, bytes], np.ndarray]:
    """Tar members (name after the key -> bytes) and per-class pixel counts of one sample."""
    loaded = source.load(sample)
    if options.image_format == "png":
        image_bytes = loaded.rgb_png or _encode(loaded.image, "PNG")
    else:
        image_bytes = _encode(loaded.image, "JPEG", quality=options.jpeg_quality)
    meta = {
        "source": sample.image,
        "mask_source": sample.mask,
        "height": loaded.image.height,
        "width": loaded.image.width,
    }
    members = {
        f"image.{options.image_format}": image_bytes,
        MASK_MEMBER: _encode(Image.fromarray(loaded.mask), "PNG"),
        JSON_MEMBER: json.dumps(meta).encode(),
    }
    counts = np.bincount(loaded.mask.ravel(), minlength=256)[: len(source.classes)]
    return members, counts


def _encode(image: Image.Image, image_format: str, **params: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()
