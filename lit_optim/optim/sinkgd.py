"""SinkGD: stateless gradient multi-normalization (SR-Sinkhorn)."""

from __future__ import annotations

import torch

from ..functional.normalize import MULTI_NORMS, multi_normalize
from ..registry import register_optimizer
from ._base import check_non_negative, check_positive_int
from ._orthogonal import OrthogonalOptimizer, shared_kwargs, with_common_args_doc

__all__ = ["SinkGD"]


@register_optimizer(
    "sinkgd",
    family="normalized (stateless)",
    paper="Gradient Multi-Normalization for Stateless and Scalable LLM Training (Scetbon, Ma, Gong & Meeds, 2025)",
    summary="alternating row/column normalization of the raw gradient to a fixed point; no state for matrices",
    default_lr=1e-3,
    grouping="matrix",
)
@with_common_args_doc
class SinkGD(OrthogonalOptimizer):
    r"""SinkGD: Sinkhorn gradient descent, a stateless multi-normalized gradient method.

    Paper: *Gradient Multi-Normalization for Stateless and Scalable LLM Training*, Meyer Scetbon,
    Chao Ma, Wenbo Gong & Edward Meeds, 2025 (arXiv:2502.06742), Algorithms 3-4.

    For every ``m x n`` matrix with gradient :math:`G_t`, :math:`L` rounds of SR-Sinkhorn:

    .. math::
        X^{(0)} &= G_t, \qquad
        Y = \sqrt{n}\, Q(X^{(\ell-1)})^{-1} X^{(\ell-1)}, \qquad
        X^{(\ell)} = \sqrt{m}\, Y R(Y)^{-1} \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, X^{(L)}

    with :math:`Q(X)` / :math:`R(X)` the diagonal matrices of row / column Euclidean norms. The
    alternation converges to a matrix whose rows all have norm :math:`\sqrt{n}` and columns norm
    :math:`\sqrt{m}` (RMS 1 per entry, like a sign update), so learning rates are Adam-like. It
    costs :math:`O(mn)` per round and keeps **no state for matrices** (no momentum): the optimizer
    state of a model is only the internal AdamW's for embeddings, head and 1-D parameters.

    Under FSDP2 (row-sharded DTensor parameters) the alternating normalizations need whole rows and
    columns: each matrix is gathered to its owner rank, normalized there and scattered back (see
    :mod:`lit_optim.optim._orthogonal`), so the result equals the one-process update to float
    rounding.

    ``norms`` generalizes the alternation to the paper's multi-normalization:
    ``("row", "spectral")`` with ``iters=1`` is the SWAN-style special case (row normalization
    then whitening by Newton-Schulz), see :func:`~lit_optim.functional.normalize.multi_normalize`.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta` (default 1e-3).
        iters: :math:`L`, SR-Sinkhorn rounds (default 5).
        norms: the norms alternated, from ``("row", "col", "spectral", "frobenius")`` (default
            ``("row", "col")``, SR-Sinkhorn).
        weight_decay: decoupled :math:`\lambda` (default 0).
        eps: added to every row/column norm (default 1e-8).
        adjust_lr: shape factor, default ``"none"`` (the update already has RMS 1).
    """

    lmo_dual_norm = "frobenius"
    momentum_key = None

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        iters: int = 5,
        norms: tuple[str, ...] = ("row", "col"),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        adjust_lr: str = "none",
        *,
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_weight_decay: float = 0.0,
        layerwise_noise_adaptive: bool = False,
        noise_beta: float = 0.99,
        noise_clip: float = 4.0,
        distributed: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ):
        if isinstance(norms, str) or not isinstance(norms, (tuple, list)) or not norms:
            raise ValueError(f"norms must be a non-empty tuple of names from {list(MULTI_NORMS)}, got {norms!r}")
        for name in norms:
            if name not in MULTI_NORMS:
                raise ValueError(f"norms entries must be in {list(MULTI_NORMS)}, got {name!r}")
        defaults = {
            "lr": lr,
            "iters": check_positive_int("iters", iters),
            "norms": tuple(norms),
            "weight_decay": check_non_negative("weight_decay", weight_decay),
            "eps": check_non_negative("eps", eps),
        }
        super().__init__(params, defaults, **shared_kwargs(locals()))

    def _init_matrix_state(self, p, state, group):
        pass

    def _matrix_state_ready(self, state):
        return True

    def _matrix_inputs(self, group, params, grads, states, ops):
        return grads

    def _transform(self, group, mats, foreach, extra=None):
        out = []
        for x in mats:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            out.append(multi_normalize(x, group["norms"], group["iters"], group["eps"]) if x.numel() else x.clone())
        return out, []
