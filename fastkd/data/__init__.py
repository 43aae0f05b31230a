"""Input pipelines: ``create_loader`` over NVIDIA DALI, a torch DataLoader, or synthetic data.

Nothing heavy is imported here: DALI, torchvision and PIL load inside the backend that uses them.
"""
from .digits import make_digits_imagefolder
from .index import CROP_PCT, DatasetIndex, build_index, shard_plan
from .base import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, Batch, BaseLoader, CorruptImageError
from .loader import create_loader

__all__ = [
    "create_loader",
    "AUGMENTATIONS",
    "make_digits_imagefolder",
    "Batch",
    "BaseLoader",
    "CorruptImageError",
    "DatasetIndex",
    "build_index",
    "shard_plan",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CROP_PCT",
]
