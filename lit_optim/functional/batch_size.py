r"""AdAdaGrad's grow-only batch-size controller and the learning-rate rescaling rules applied
when the batch grows, without a Trainer (the Lightning and Hugging Face ``AdaptiveBatchSizeCallback``
share it). The tests it runs are in :mod:`lit_optim.functional.sampling_tests`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._validation import check_choice, check_in_range, check_positive, check_positive_int
from .sampling_tests import SAMPLING_TESTS, GradSampleStats, SamplingTestResult, run_sampling_test

__all__ = ["LR_SCALING_RULES", "BatchSizeController", "lr_scale_factor"]

LR_SCALING_RULES = ("none", "linear", "sqrt")


def lr_scale_factor(rule: str, old_batch_size: float, new_batch_size: float) -> float:
    r"""Multiplier of the learning rate when the batch grows from ``old`` to ``new``.

    From *Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural
    Network Training* (Granziol et al., JMLR 2022): the largest stable learning rate grows
    linearly with the batch size for SGD (``"linear"``: :math:`B'/B`) and as its square root for
    adaptive methods such as Adam (``"sqrt"``: :math:`\sqrt{B'/B}`); ``"none"`` keeps it.
    """
    rule = check_choice("lr_scaling", rule, LR_SCALING_RULES)
    old = check_positive("old_batch_size", old_batch_size)
    new = check_positive("new_batch_size", new_batch_size)
    if rule == "none":
        return 1.0
    if rule == "linear":
        return new / old
    return math.sqrt(new / old)


class BatchSizeController:
    """Grow-only batch-size schedule driven by a test of adaptive sampling (AdAdaGrad).

    Usage without any Trainer::

        ctl = BatchSizeController(batch_size=32, max_batch_size=1024, test="norm", eta=0.1)
        result = ctl.observe(stats)        # GradSampleStats of the current batch
        new_bs = ctl.decide()              # >= the current size, <= max_batch_size
        if new_bs > ctl.batch_size:
            factor = ctl.grow_to(new_bs)   # the lr multiplier of the chosen rule
            ...                            # apply new_bs (accumulation, loader) and the factor

    Args:
        batch_size: the current (initial) effective batch size.
        max_batch_size: the cap.
        test, eta, theta, nu, coordinate_quantile: see :func:`run_sampling_test`.
        lr_scaling: ``"none"``, ``"linear"`` or ``"sqrt"`` (see :func:`lr_scale_factor`).
    """

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        *,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float | None = None,
        coordinate_quantile: float = 1.0,
        lr_scaling: str = "none",
    ):
        self.test = check_choice("test", test, SAMPLING_TESTS)
        self.eta = check_positive("eta", eta)
        self.theta = check_positive("theta", theta)
        self.nu = None if nu is None else check_positive("nu", nu)
        self.coordinate_quantile = check_in_range(
            "coordinate_quantile", coordinate_quantile, 0.0, 1.0, low_closed=False
        )
        self.lr_scaling = check_choice("lr_scaling", lr_scaling, LR_SCALING_RULES)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        if self.max_batch_size < self.batch_size:
            raise ValueError(
                f"max_batch_size must be >= the initial batch size {self.batch_size}, got {max_batch_size}"
            )
        self.initial_batch_size = self.batch_size
        self.lr_factor = 1.0
        self.requested = self.batch_size
        self.num_observations = 0
        self.last_result: SamplingTestResult | None = None

    def observe(self, stats: GradSampleStats) -> SamplingTestResult | None:
        """Run the test on ``stats``; non-finite statistics (e.g. an AMP overflow) are ignored
        and return None."""
        if stats.count < 2:
            return None
        if not (math.isfinite(stats.mean_sq_norm) and math.isfinite(stats.sum_sq_norm)):
            return None
        result = run_sampling_test(
            stats, self.test, eta=self.eta, theta=self.theta, nu=self.nu, coordinate_quantile=self.coordinate_quantile
        )
        if math.isnan(result.required_batch_size):
            return None
        self.num_observations += 1
        self.last_result = result
        if result.required_batch_size > self.requested:
            self.requested = min(self.max_batch_size, math.ceil(min(result.required_batch_size, 1e18)))
        return result

    def decide(self) -> int:
        """The batch size to use from now on: the largest size requested so far, at least the
        current size, at most ``max_batch_size``."""
        return max(self.batch_size, min(self.requested, self.max_batch_size))

    def grow_to(self, new_batch_size: int) -> float:
        """Record that the batch is now ``new_batch_size`` (>= the current one; it may exceed the
        decision by rounding to whole micro-batches) and return the lr multiplier to apply."""
        new_batch_size = check_positive_int("new_batch_size", new_batch_size)
        if new_batch_size < self.batch_size:
            raise ValueError(f"the batch size only grows: new_batch_size {new_batch_size} < current {self.batch_size}")
        factor = lr_scale_factor(self.lr_scaling, self.batch_size, new_batch_size)
        self.batch_size = new_batch_size
        self.requested = max(self.requested, new_batch_size)
        self.lr_factor *= factor
        return factor

    def state_dict(self) -> dict[str, Any]:
        last = self.last_result
        return {
            "batch_size": self.batch_size,
            "initial_batch_size": self.initial_batch_size,
            "requested": self.requested,
            "lr_factor": self.lr_factor,
            "num_observations": self.num_observations,
            "last_result": None if last is None else dict(vars(last)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
        self.initial_batch_size = int(state["initial_batch_size"])
        self.requested = int(state["requested"])
        self.lr_factor = float(state["lr_factor"])
        self.num_observations = int(state["num_observations"])
        last = state.get("last_result")
        self.last_result = None if last is None else SamplingTestResult(**last)
