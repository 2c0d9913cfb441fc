"""NorMuon: Muon plus neuron-wise second-moment normalization after orthogonalization."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_optimizer
from ._base import check_in_range, check_non_negative
from ._orthogonal import (
    OrthogonalOptimizer,
    _state_dtype,
    momentum_defaults,
    ns_group_defaults,
    shared_kwargs,
    with_common_args_doc,
)

__all__ = ["NorMuon"]


@register_optimizer(
    "normuon",
    family="orthogonalized",
    paper="NorMuon: Making Muon more efficient and scalable (Li, Liu, Liang, Chen & Zhao, 2025)",
    summary="Muon + per-neuron second moments: row-wise normalization of the orthogonalized update",
    default_lr=0.02,
    grouping="matrix",
)
@with_common_args_doc
class NorMuon(OrthogonalOptimizer):
    r"""NorMuon: neuron-wise normalized Muon.

    Paper: *NorMuon: Making Muon more efficient and scalable*, Zichong Li, Liming Liu, Chen Liang,
    Weizhu Chen & Tuo Zhao, 2025 (arXiv:2510.05491), Algorithm 1.

    For an ``m x n`` matrix (rows = output neurons) with gradient :math:`G_t`:

    .. math::
        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad O_t = \mathrm{NS}_k(\tilde M_t)
            \quad(\tilde M_t \text{ Nesterov or } M_t \text{ as in Muon}) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\,\operatorname{mean}_{\text{cols}}(O_t \odot O_t)
            \in \mathbb{R}^m \\
        \hat O_t &= O_t \,/\, (\sqrt{v_t} + \epsilon) \ \text{(row-wise)}, \qquad
        \hat O_t \leftarrow \hat O_t\, \frac{\lVert O_t\rVert_F}{\lVert \hat O_t\rVert_F} \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, \hat O_t

    Where the paper leaves the overall scale open we follow the authors' public code: the
    normalized update keeps the Frobenius norm of :math:`O_t` ("preserve norm"), and the shape
    factor :math:`s` is Muon's ``adjust_lr``; with ``adjust_lr="match_rms_adamw"`` the update RMS
    is about 0.2, the paper's :math:`0.2\sqrt{mn}/\lVert\hat O_t\rVert_F` rescaling. The second
    moment is one number per output neuron (:math:`m` per matrix; ``second_moment`` in the state,
    float32 for half-precision parameters): memory about Muon's.

    Under FSDP2 (parameters sharded by rows) the whole step after the momentum runs on the matrix's
    owner rank (:mod:`lit_optim.optim._orthogonal`), so the neuron-wise moments and the norm
    preservation equal the one-process values (to float rounding) (the paper's FSDP2 implementation also spreads
    the orthogonalization over devices; per-shard approximations, as in some peers, are not used).
    ``second_moment`` is then a regular tensor replicated on every rank (the owner sends its new
    value with the result): every rank has the same state keys, and a distributed checkpoint
    stores one copy.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` for the matrices (default 0.02).
        momentum: :math:`\mu` (default 0.95).
        beta2: :math:`\beta_2` of the neuron-wise second moment (default 0.95, the paper's).
        nesterov: Nesterov momentum (default True, as the authors' code).
        weight_decay: decoupled :math:`\lambda` (default 0).
        eps: :math:`\epsilon` in the row normalization (default 1e-8).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: Newton-Schulz coefficients (default ``"quintic"``).
        ns_eps: added to the Frobenius norm before the iteration (default 1e-7).
        ns_dtype: Newton-Schulz dtype (default None: the parameter's, at least float32).
        ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"``.
        adjust_lr: shape factor ``"original"`` (default), ``"match_rms_adamw"`` or ``"none"``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_coefficients: Any = "quintic",
        ns_eps: float = 1e-7,
        ns_dtype: Any = None,
        ns_method: str = "auto",
        adjust_lr: str = "original",
        *,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        adam_weight_decay: float = 0.0,
        layerwise_noise_adaptive: bool = False,
        noise_beta: float = 0.99,
        noise_clip: float = 4.0,
        distributed: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        defaults = dict(
            lr=lr,
            beta2=check_in_range("beta2", beta2, 0.0, 1.0, high_closed=False),
            eps=check_non_negative("eps", eps),
            weight_decay=check_non_negative("weight_decay", weight_decay),
            **momentum_defaults(momentum, nesterov),
            **ns_group_defaults(ns_steps, ns_coefficients, ns_eps, ns_dtype, ns_method),
        )
        super().__init__(params, defaults, **shared_kwargs(locals()))

    matrix_stat_keys = ("second_moment",)

    def _init_matrix_state(self, p, state, group):
        super()._init_matrix_state(p, state, group)
        view = self._view(p, group)
        state["second_moment"] = torch.zeros(view[:-1], dtype=_state_dtype(p), device=p.device)

    def _matrix_state_ready(self, state):
        return "momentum_buffer" in state and "second_moment" in state

    def _finish(self, group, params, grads, states, mats, outs):
        beta2, eps = group["beta2"], group["eps"]
        dirs = []
        for st, o in zip(states, outs):
            v = st["second_moment"]
            o = o.to(v.dtype)
            v.lerp_(o.square().mean(dim=-1), 1.0 - beta2)
            normed = o / (v.sqrt().unsqueeze(-1) + eps)
            dims = (-2, -1)
            ratio = torch.linalg.vector_norm(o, dim=dims, keepdim=True) / (
                torch.linalg.vector_norm(normed, dim=dims, keepdim=True) + eps
            )
            dirs.append(normed.mul_(ratio))
        return dirs
