"""Gradient statistics without a Trainer: the names of the original single module, kept so that
``lit_optim.functional.grad_stats.X`` keeps working. The code lives in one module per concern:

* :mod:`lit_optim.functional.per_example`: flat gradients and per-example gradients (``torch.func``);
* :mod:`lit_optim.functional.sampling_tests`: statistics of gradient samples and the tests of
  adaptive sampling (norm, inner-product, coordinate-wise; AdAdaGrad);
* :mod:`lit_optim.functional.batch_size`: the grow-only batch-size controller and the
  learning-rate rescaling rules;
* :mod:`lit_optim.functional.median`: the across-iterations median estimators and median
  gradient clipping.

Everything is also exported from :mod:`lit_optim.functional`.
"""

from __future__ import annotations

from .batch_size import LR_SCALING_RULES, BatchSizeController, lr_scale_factor
from .median import CLIP_MODES, LogMedianEstimator, MedianClipper, WindowMedian
from .per_example import flat_grads, per_example_grads
from .sampling_tests import (
    SAMPLING_TESTS,
    GradSampleAccumulator,
    GradSampleStats,
    MicroBatchGradStats,
    SamplingTestResult,
    coordinate_test,
    inner_product_test,
    norm_test,
    run_sampling_test,
)

__all__ = [
    "CLIP_MODES",
    "LR_SCALING_RULES",
    "SAMPLING_TESTS",
    "BatchSizeController",
    "GradSampleAccumulator",
    "GradSampleStats",
    "LogMedianEstimator",
    "MedianClipper",
    "MicroBatchGradStats",
    "SamplingTestResult",
    "WindowMedian",
    "coordinate_test",
    "flat_grads",
    "inner_product_test",
    "lr_scale_factor",
    "norm_test",
    "per_example_grads",
    "run_sampling_test",
]
