"""AdaGrad (coordinate-wise) and AdaGradNorm (one step size per parameter group)."""

from __future__ import annotations

import math

import torch

from ..registry import register_optimizer
from . import _dtensor
from ._base import ELEMENTWISE_BLOCK_NUMEL, LitOptimizer, apply_weight_decay, check_lr, check_non_negative
from ._precision import LOW_PRECISION, Float32Math, state_dtype

__all__ = ["AdaGrad", "AdaGradNorm"]


@register_optimizer(
    "adagrad",
    family="AdaGrad",
    paper="Adaptive Subgradient Methods for Online Learning and Stochastic Optimization (Duchi et al., JMLR 2011); "
    "driven by AdAdaGrad (Lau et al., 2024)",
    summary="coordinate-wise AdaGrad; the update rule AdaptiveBatchSizeCallback's coordinate test is built for",
    default_lr=1e-2,
)
class AdaGrad(Float32Math, LitOptimizer):
    r"""Coordinate-wise AdaGrad, the update rule of AdAdaGrad.

    Papers: *Adaptive Subgradient Methods for Online Learning and Stochastic Optimization*,
    Duchi, Hazan & Singer, JMLR 2011; used as the base method of *AdAdaGrad: Adaptive Batch Size
    Schemes for Adaptive Gradient Methods*, Lau et al., 2024 (arXiv:2402.11215), whose batch-size
    schedule :class:`~lit_optim.callbacks.AdaptiveBatchSizeCallback` implements.

    .. math::
        v_t &= v_{t-1} + g_t \odot g_t, \qquad v_0 = b_0^2 \\
        \theta_t &= \theta_{t-1} - \eta\, \frac{g_t}{\sqrt{v_t} + \epsilon}

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-2, as torch.optim.Adagrad).
        eps: :math:`\epsilon` added to the denominator (default 1e-10, as torch.optim.Adagrad). ``eps=0``
            is refused unless ``initial_accumulator_value > 0``: a coordinate whose gradient has
            always been zero would give 0/0.
        initial_accumulator_value: :math:`b_0^2`, the starting value of every accumulator (default 0).
        weight_decay: L2 penalty :math:`\lambda` added to the gradient (default 0).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the accumulator is kept and the update computed in float32
    (:mod:`lit_optim.optim._precision`).
    """

    state_keys = ("sum",)
    elementwise = True
    block_numel = ELEMENTWISE_BLOCK_NUMEL

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            eps=check_non_negative("eps", eps),
            initial_accumulator_value=check_non_negative("initial_accumulator_value", initial_accumulator_value),
            weight_decay=check_non_negative("weight_decay", weight_decay),
        )
        _check_eps_with_accumulator(defaults)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def _normalize_group(self, group):
        group = super()._normalize_group(group)
        if "eps" in group or "initial_accumulator_value" in group:
            _check_eps_with_accumulator({**self.defaults, **group})
        return group

    def _init_state(self, p, state, group):
        state["sum"] = torch.full_like(
            p, group["initial_accumulator_value"], dtype=state_dtype(p), memory_format=torch.preserve_format
        )

    def _update_math(self, group, params, grads, state, step, ops):
        grads = apply_weight_decay(ops, params, grads, group["lr"], group["weight_decay"], False)
        acc = state["sum"]
        ops.addcmul_(acc, grads, grads, value=1.0)
        denom = ops.sqrt(acc)
        ops.add_(denom, group["eps"])
        ops.addcdiv_(params, grads, denom, value=-group["lr"])


def _check_eps_with_accumulator(hp) -> None:
    if hp["eps"] == 0.0 and hp["initial_accumulator_value"] == 0.0:
        raise ValueError(
            "eps must be in (0, inf) when initial_accumulator_value is 0, got eps=0.0: a coordinate whose gradient "
            "has always been zero would divide 0 by 0 (NaN); pass eps > 0 or initial_accumulator_value > 0"
        )


@register_optimizer(
    "adagradnorm",
    family="AdaGrad",
    paper="AdaGrad stepsizes: sharp convergence over nonconvex landscapes (Ward, Wu & Bottou, ICML 2019); "
    "driven by AdAdaGrad (Lau et al., 2024)",
    summary="AdaGrad with one scalar step size per parameter group; SGD that tunes its own step size",
    default_lr=1.0,
)
class AdaGradNorm(LitOptimizer):
    r"""AdaGrad-Norm: one adaptive step size per parameter group (the update rule of AdAdaGradNorm).

    Papers: *AdaGrad stepsizes: sharp convergence over nonconvex landscapes*, Ward, Wu & Bottou,
    ICML 2019; *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods*, Lau et al.,
    2024, which proves that AdaGradNorm with its adaptive batch sizes converges at
    :math:`O(1/K)`.

    .. math::
        b_t^2 &= b_{t-1}^2 + \lVert g_t \rVert_2^2 \quad\text{(norm over all parameters of the group)} \\
        \theta_t &= \theta_{t-1} - \eta\, \frac{g_t}{b_t + \epsilon}

    The accumulator :math:`b_t^2` is a single number kept in the parameter group under
    ``"sum_sq_norm"`` (it is saved by ``state_dict``). Put all parameters in one group for the
    global AdaGrad-Norm of the paper.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1.0; AdaGrad-Norm is robust to it, the paper sweeps 1e-2..1e2).
        eps: :math:`\epsilon` (default 1e-10). ``eps=0`` is allowed: while :math:`b_t = 0` every
            gradient of the group has been exactly zero and the step is zero.
        initial_accumulator_value: :math:`b_0^2` (default 0; Ward et al. take :math:`b_0>0` small).
        weight_decay: L2 penalty added to the gradient (default 0).
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`.

    float16 / bfloat16 parameters: the norms are computed in float32 (a float16 norm overflows at
    65504) and each parameter is updated with one rounding, :math:`\theta + s\,g` evaluated in
    float32.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=check_lr(lr),
            eps=check_non_negative("eps", eps),
            initial_accumulator_value=check_non_negative("initial_accumulator_value", initial_accumulator_value),
            weight_decay=check_non_negative("weight_decay", weight_decay),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("sum_sq_norm", float(group["initial_accumulator_value"]))

    #: the group norm is summed over the shards of DTensor (FSDP2) parameters
    supports_dtensor = True

    def _step_group(self, group, params, grads):
        for p in params:
            self._ensure_state(p, group)["step"] += 1
        groups = _dtensor.sharded_mesh_groups(params)
        sharded = [bool(_dtensor.sharded_mesh_groups([p])) for p in params]
        params, grads = _dtensor.locals_(params), _dtensor.locals_(grads)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        foreach = group["foreach"] is None or group["foreach"]
        from ._base import FOREACH_OPS, LOOP_OPS

        ops = FOREACH_OPS if foreach else LOOP_OPS
        grads = apply_weight_decay(ops, params, grads, group["lr"], group["weight_decay"], False)
        sq = 0.0
        if groups:
            # one all-reduce of the local sums of squares over the shards (tensors that are not
            # sharded hold the same values on every rank and are counted once)
            norms = _sq_norms(ops, grads)
            part = math.fsum(n for n, sh in zip(norms, sharded) if sh)
            sq = float(_dtensor.all_reduce_over_shards(torch.tensor(part, dtype=torch.float64), groups))
            sq += math.fsum(n for n, sh in zip(norms, sharded) if not sh)
        else:
            for n in _sq_norms(ops, grads):
                sq += n
        group["sum_sq_norm"] += sq
        denom = math.sqrt(group["sum_sq_norm"]) + group["eps"]
        # denom 0 (eps=0): every gradient so far was exactly zero; step 0, not -inf * 0 = NaN
        scale = -group["lr"] / denom if denom > 0.0 else 0.0
        ops.add_(params, grads, alpha=scale)


def _sq_norms(ops, grads) -> list[float]:
    """Squared L2 norms of ``grads`` as Python floats, float16/bfloat16 ones reduced in float32."""
    if not any(g.dtype in LOW_PRECISION for g in grads):
        return [float(n) ** 2 for n in ops.norm(grads)]
    if all(g.dtype in LOW_PRECISION for g in grads):
        return [float(n) ** 2 for n in ops.norm(grads, 2, dtype=torch.float32)]
    return [
        float(torch.linalg.vector_norm(g, 2, dtype=torch.float32 if g.dtype in LOW_PRECISION else None)) ** 2
        for g in grads
    ]
