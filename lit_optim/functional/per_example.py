r"""Gradients as flat vectors: the flattened ``.grad`` of a list of parameters
(:func:`flat_grads`) and per-example gradients from ``torch.func`` (:func:`per_example_grads`), the
gradient samples behind the adaptive-sampling tests (:mod:`lit_optim.functional.sampling_tests`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flat_grads", "per_example_grads"]


def flat_grads(params: Iterable[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Concatenate the gradients of ``params`` into one flat ``dtype`` vector (zeros where a
    gradient is None), in the order given."""
    pieces = []
    device = None
    for p in params:
        device = p.device if device is None else device
        if p.grad is None:
            pieces.append(torch.zeros(p.numel(), dtype=dtype, device=p.device))
        else:
            if p.grad.is_sparse:
                raise TypeError("flat_grads: sparse gradients are not supported")
            pieces.append(p.grad.detach().reshape(-1).to(dtype))
    if not pieces:
        return torch.zeros(0, dtype=dtype)
    return torch.cat(pieces)


def _tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_tree_map(fn, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    raise TypeError(
        f"per-example gradients need a batch made of tensors (in tuples, lists or dicts); found {type(tree).__name__}"
    )


def _leading_dim(tree: Any) -> int:
    sizes: list[int] = []
    _tree_map(lambda t: sizes.append(t.shape[0]) or t, tree)
    if not sizes:
        raise ValueError("the batch holds no tensors")
    if len(set(sizes)) != 1:
        raise ValueError(
            f"every tensor of the batch must share its first (batch) dimension, got sizes {sorted(set(sizes))}"
        )
    return sizes[0]


class _LossModule(nn.Module):
    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.inner = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


def per_example_grads(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    params: Sequence[tuple[str, Tensor]] | None = None,
    max_examples: int | None = None,
) -> Tensor:
    """Per-example gradients as a ``[B, P]`` float32 matrix (``torch.func``: ``vmap`` over ``grad``).

    ``loss_fn(module, batch)`` must return the mean loss of ``batch`` (it is called with batches of
    one example). ``params`` are ``(name, parameter)`` pairs to differentiate (default: every
    parameter that requires grad), flattened in that order. Cost: one extra forward and backward
    per example (vectorised) and ``B x P`` memory. Modules that mix examples (BatchNorm in
    training mode) are not supported by ``vmap``.
    """
    if params is None:
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    wanted = {n for n in names}
    wrapper = _LossModule(module, loss_fn)
    diff = {f"inner.{n}": p.detach() for n, p in params}
    fixed = {f"inner.{n}": p.detach() for n, p in module.named_parameters() if n not in wanted}
    fixed.update({f"inner.{n}": b.detach() for n, b in module.named_buffers()})
    b = _leading_dim(batch)
    if max_examples is not None and max_examples < b:
        batch = _tree_map(lambda t: t[:max_examples], batch)

    def one(p: dict[str, Tensor], example: Any) -> Tensor:
        ex = _tree_map(lambda t: t.unsqueeze(0), example)
        return torch.func.functional_call(wrapper, {**p, **fixed}, (ex,))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0), randomness="different")(diff, batch)
    return torch.cat([grads[f"inner.{n}"].reshape(grads[f"inner.{n}"].shape[0], -1).float() for n in names], dim=1)
