"""Lightning callbacks, each a thin shell over Trainer-free code in ``lit_optim.functional`` /
``lit_optim.curvature``."""

from .adaptive_batch_size import AdaptiveBatchSizeCallback
from .grad_clip_median import GradClipMedianCallback
from .hessian_diag import HessianDiagCallback
from .stability_gap import StabilityGapEvaluator
from .weight_averaging import WeightAveragingCallback, average_checkpoints, extract_average

__all__ = [
    "HessianDiagCallback",
    "AdaptiveBatchSizeCallback",
    "GradClipMedianCallback",
    "WeightAveragingCallback",
    "average_checkpoints",
    "extract_average",
    "StabilityGapEvaluator",
]
