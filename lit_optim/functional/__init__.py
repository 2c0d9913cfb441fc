"""Pure maths shared by the optimizers and callbacks: no state, no Trainer."""

from .averaging import MultiEMA, average_state_dicts, check_shared_init, init_fingerprint, weight_similarity
from .continual_metrics import StabilityGapTracker
from .dct import dct_basis, dct_indices
# gradient statistics: one module per concern (grad_stats re-exports them all); log_keys names
# what the Lightning callbacks and their HF twins log
from . import batch_size, log_keys, median, per_example, sampling_tests
from .grad_stats import (
    BatchSizeController,
    GradSampleAccumulator,
    GradSampleStats,
    LogMedianEstimator,
    MedianClipper,
    MicroBatchGradStats,
    SamplingTestResult,
    WindowMedian,
    coordinate_test,
    flat_grads,
    inner_product_test,
    lr_scale_factor,
    norm_test,
    per_example_grads,
    run_sampling_test,
)
from .hutchinson import (
    DoubleBackwardError,
    differentiable_grads,
    hessian_vector_product,
    probe_like,
    probe_seed,
    sample_labels,
)
from .lowrank import project, project_back, random_basis, random_indices, svd_basis, topk_indices
from .newton_schulz import (
    NS_PRESETS,
    fit_coefficient_schedule,
    newton_schulz,
    orthogonalize,
    polar_factor,
    root_coefficients,
)
from .normalize import cosh_rms_normalize, multi_normalize, sinkhorn_normalize
from .subset import subset_sq

__all__ = [
    # curvature (issue 4): functional/hutchinson.py
    "DoubleBackwardError",
    "differentiable_grads",
    "hessian_vector_product",
    "probe_like",
    "probe_seed",
    "sample_labels",
    # memory-reduced (issue 5): functional/lowrank.py, dct.py, subset.py
    "dct_basis",
    "dct_indices",
    "project",
    "project_back",
    "random_basis",
    "random_indices",
    "svd_basis",
    "topk_indices",
    "subset_sq",
    # orthogonalized family (issue 10): functional/newton_schulz.py, normalize.py
    "NS_PRESETS",
    "fit_coefficient_schedule",
    "newton_schulz",
    "orthogonalize",
    "polar_factor",
    "root_coefficients",
    "cosh_rms_normalize",
    "multi_normalize",
    "sinkhorn_normalize",
    # gradient statistics (issue 6): functional/per_example.py, sampling_tests.py, batch_size.py, median.py
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
    # evaluation callbacks (issue 7): functional/averaging.py
    "MultiEMA",
    "average_state_dicts",
    "check_shared_init",
    "init_fingerprint",
    "weight_similarity",
    "StabilityGapTracker",
]
