"""Dataset sources: each turns one on-disk layout into validated samples for the shard writer."""

from data.sources.ade20k import ADE20K
from data.sources.base import (
    IGNORE_INDEX,
    DataError,
    LoadedSample,
    Sample,
    SampleError,
    Source,
    SourceError,
)
from data.sources.camvid import CamVid
from data.sources.cityscapes import Cityscapes
from data.sources.folder import Folder
from data.sources.synthetic import Synthetic
from data.sources.voc import VOC

__all__ = [
    "ADE20K",
    "IGNORE_INDEX",
    "VOC",
    "CamVid",
    "Cityscapes",
    "DataError",
    "Folder",
    "LoadedSample",
    "Sample",
    "SampleError",
    "Source",
    "SourceError",
    "Synthetic",
]
