"""Gauss-Newton-Bartlett (GNB) estimator of the diagonal of the Gauss-Newton matrix.

Paper: *Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training*,
Liu, Li, Hall, Liang & Ma, ICLR 2024 (arXiv:2305.14342), Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional.hutchinson import sample_labels
from .sharded import any_sharded, sharded_gnb_diagonal

__all__ = ["LIKELIHOODS", "gnb_diagonal"]

LIKELIHOODS = ("categorical", "gaussian")


def gnb_diagonal(
    logits: Tensor,
    params: Sequence[Tensor],
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    loss_scale: float = 1.0,
    likelihood: str = "categorical",
) -> list[Tensor | None]:
    r"""GNB estimate of the diagonal of the Gauss-Newton matrix of the mean loss over the
    :math:`N` outputs in ``logits``.

    Labels :math:`\hat y_n` are sampled from the model's own predictive distribution (no gradient
    flows through the sampling), and

    .. math::
        \hat L(\theta) = \frac{1}{N}\sum_{n=1}^{N} \ell(f_n(\theta), \hat y_n), \qquad
        \widehat{\operatorname{diag}}(G) = N\, \nabla\hat L \odot \nabla \hat L .

    By Bartlett's identity :math:`E_{\hat y}[\nabla \ell\, \nabla \ell^\top] = J^\top (\nabla^2 \ell) J`,
    so the estimate is unbiased for the Gauss-Newton diagonal of the mean loss, and is never
    negative. It costs one ordinary backward per sample (no double backward), so it works through
    fused attention kernels. For a model linear in its parameters the Gauss-Newton matrix *is* the
    Hessian.

    * ``likelihood="categorical"``: ``logits`` is ``(..., C)``; the loss is cross-entropy
      (every position of a sequence model is one output: :math:`N` counts tokens).
    * ``likelihood="gaussian"``: ``logits`` are regression outputs ``(..., D)``; samples are
      :math:`\hat y = f + \varepsilon`, :math:`\varepsilon \sim N(0, I)`, and the loss is
      :math:`\tfrac12\lVert f - \hat y\rVert^2` summed over the last dimension and averaged over
      the :math:`N` rows (scale the result if your loss is scaled differently).

    **FSDP2** (``fully_shard``; ``params`` are DTensors): ``torch.autograd.grad`` does not reach
    sharded parameters, so each sample runs one ``backward()`` instead; FSDP2 reduce-scatters it
    into ``param.grad`` (the gradient the caller had there is put back afterwards) and the estimate
    is taken on the local shards, with :math:`N` and :math:`\nabla \hat L` over the *global* batch
    (all ranks' outputs): the estimate one process would compute on the global batch with the same
    sampled labels. It is returned as DTensors laid out like the parameters, ready for
    ``optimizer.update_hessian``. Call it on every rank, with every parameter that receives a
    gradient in ``params`` (their ``.grad`` is restored; see
    :func:`lit_optim.curvature.sharded.stashed_grads` for others). 1-D meshes only (see
    :mod:`lit_optim.curvature.sharded`).

    Args:
        logits: model outputs with their graph.
        params: the parameters; the result is aligned with them.
        n_samples: label draws averaged (error falls as :math:`1/\sqrt{S}`).
        generator: ``torch.Generator`` on the logits' device for reproducible labels.
        mask: optional boolean tensor shaped like ``logits.shape[:-1]``; only rows where it is True
            count (padding tokens), :math:`N` is their number.
        loss_scale: the sampled loss is multiplied by this before differentiating and the
            gradient divided by it (float16 AMP).
        likelihood: ``"categorical"`` (default) or ``"gaussian"``.

    Returns:
        One non-negative tensor per parameter, or None for parameters the outputs do not depend on.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
    if not (isinstance(loss_scale, (int, float)) and 0 < loss_scale < float("inf")):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError(f"logits must be a tensor with a class/output dimension, got {type(logits).__name__}")
    if not logits.requires_grad:
        raise ValueError("logits do not require grad: compute them from the parameters with gradients enabled")
    params = list(params)
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is not None:
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(logits.shape[:-1])}, got {tuple(mask.shape)}")
        flat = flat[mask.reshape(-1).to(torch.bool)]
    if any_sharded(params):  # FSDP2: one backward per sample; a rank may hold no outputs
        return _gnb_sharded(flat, params, n_samples, generator, loss_scale, likelihood)
    n = flat.shape[0]
    if n == 0:
        raise ValueError("gnb_diagonal: no outputs to sample labels for (empty logits or all-False mask)")
    diag: list[Tensor | None] | None = None
    with torch.enable_grad():
        for s in range(n_samples):
            loss = _sampled_loss_sum(flat, generator, likelihood) / n
            if loss_scale != 1.0:
                loss = loss * loss_scale
            grads = torch.autograd.grad(loss, params, retain_graph=s + 1 < n_samples, allow_unused=True)
            with torch.no_grad():
                if diag is None:
                    diag = [None if g is None else torch.zeros_like(p) for g, p in zip(grads, params)]
                for d, g in zip(diag, grads):
                    if d is not None and g is not None:
                        d.addcmul_(g, g)
    assert diag is not None
    if all(d is None for d in diag):
        raise ValueError("gnb_diagonal: the logits do not depend on any of the given parameters")
    factor = n / (n_samples * loss_scale * loss_scale)
    with torch.no_grad():
        for d in diag:
            if d is not None:
                d.mul_(factor)
    return diag


def _sampled_loss_sum(flat: Tensor, generator: torch.Generator | None, likelihood: str) -> Tensor:
    """The loss against labels sampled from the model's own predictive distribution, summed over
    the rows of ``flat``."""
    if likelihood == "categorical":
        y = sample_labels(flat, generator)
        return F.cross_entropy(flat, y, reduction="sum")
    noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    target = flat.detach() + noise
    return 0.5 * (flat - target).pow(2).sum()


def _gnb_sharded(flat, params, n_samples, generator, loss_scale, likelihood) -> list[Tensor | None]:
    n = flat.shape[0]

    def losses():
        with torch.enable_grad():
            for s in range(n_samples):
                yield _sampled_loss_sum(flat, generator, likelihood), n, s + 1 < n_samples

    diag = sharded_gnb_diagonal(losses(), params, n_samples, loss_scale)
    if all(d is None for d in diag):
        raise ValueError("gnb_diagonal: the logits do not depend on any of the given parameters")
    return diag
