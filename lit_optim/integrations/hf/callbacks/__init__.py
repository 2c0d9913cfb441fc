"""The lit_optim ``TrainerCallback`` twins of the Lightning callbacks, one module each, on the
shared base :class:`LitCallback` (checkpoint files and logging)."""

from .adaptive_batch_size import AdaptiveBatchSizeCallback
from .base import LitCallback
from .grad_clip_median import GradClipMedianCallback
from .stability_gap import StabilityGapCallback
from .weight_averaging import WeightAveragingCallback

__all__ = [
    "AdaptiveBatchSizeCallback",
    "GradClipMedianCallback",
    "LitCallback",
    "StabilityGapCallback",
    "WeightAveragingCallback",
]
