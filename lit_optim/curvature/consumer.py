"""The protocol between curvature estimators and the optimizers that consume them.

An optimizer that preconditions with a Hessian-diagonal estimate (:class:`~lit_optim.Sophia`,
:class:`~lit_optim.AdaHessian`) subclasses :class:`HessianConsumer` and receives estimates in one of
two ways:

* **External** (Lightning, or any loop that estimates itself):
  ``optimizer.update_hessian(diag)`` with ``diag`` a list aligned with the optimizer's parameters
  (``[p for g in optimizer.param_groups for p in g["params"]]``, None to skip one) or a dict
  ``{param: tensor}``. :class:`lit_optim.callbacks.HessianDiagCallback` does this under automatic
  optimization. Once estimates come from outside, ``step(closure)`` treats the closure as an ordinary
  one (it may call ``backward()``; Lightning's does).
* **Closure** (plain PyTorch, nothing else to write): ``optimizer.step(closure)`` where the closure
  returns the loss *without calling backward()*. Every ``update_period`` steps the optimizer takes
  the gradient and a Hutchinson estimate from that loss with ``torch.autograd.grad`` (double
  backward through the gradient, freed right after; no ``backward(create_graph=True)``), in between
  only the gradient. Gradients are accumulated into ``.grad`` as ``backward()`` would.

Under FSDP2 (DTensor parameters) only the external mode works: estimate with
:func:`lit_optim.curvature.gnb_diagonal`, which runs on the shards, and pass its DTensors (or
full-shape regular tensors, cut to the local shard without communication) to
``update_hessian``. Closure mode needs ``torch.autograd.grad`` to reach the parameters and a double
backward, neither of which runs through ``fully_shard``; it raises
:class:`~lit_optim.curvature.sharded.ShardedDoubleBackwardError`.

The mode is kept in every parameter group under ``"external_hessian"`` (saved by ``state_dict``);
:meth:`HessianConsumer.update_hessian` and :meth:`HessianConsumer.expect_external_hessian` set it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..functional.hutchinson import (
    PROBE_DISTRIBUTIONS,
    differentiable_grads,
    hessian_vector_product,
    make_generator,
    probe_like,
    probe_seed,
)
from ..optim import _dtensor
from ..optim._base import LitOptimizer, NonFiniteGradientError, check_choice, check_positive_int
from ..optim._precision import state_dtype
from .sharded import refuse_sharded_double_backward

__all__ = ["HessianConsumer", "is_hessian_consumer"]


def is_hessian_consumer(optimizer: Any) -> bool:
    """True when ``optimizer`` (or the optimizer a Lightning wrapper holds) has ``update_hessian``."""
    return callable(getattr(optimizer, "update_hessian", None))


class HessianConsumer(LitOptimizer):
    """Base of optimizers that consume Hessian-diagonal estimates (see the module docstring).

    Subclasses pass ``update_period``, ``n_probes``, ``probe`` and ``seed`` (the closure-mode
    estimator) through :meth:`_hessian_defaults`, set :attr:`hessian_estimator` (what
    :class:`~lit_optim.callbacks.HessianDiagCallback` runs when asked for ``estimator=None``) and
    implement :meth:`_apply_hessian`, which folds one parameter's estimate into its state.
    """

    #: estimator the callback uses by default for this optimizer: "gnb" or "hutchinson"
    hessian_estimator: str = "hutchinson"

    def __init__(self, params, defaults, **kwargs: Any):
        super().__init__(params, dict(defaults, external_hessian=False), **kwargs)
        #: estimates refused because they held NaN/Inf (``nonfinite="skip"``)
        self.skipped_hessian_updates = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "skipped_hessian_updates"):
            self.skipped_hessian_updates = 0

    @staticmethod
    def _hessian_defaults(update_period: int, n_probes: int, probe: str, seed: int) -> dict[str, Any]:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
        return {
            "update_period": check_positive_int("update_period", update_period),
            "n_probes": check_positive_int("n_probes", n_probes),
            "probe": check_choice("probe", probe, PROBE_DISTRIBUTIONS),
            "seed": seed,
        }

    # -- subclass hook --------------------------------------------------------------------------

    def _apply_hessian(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], diag: Tensor) -> None:
        raise NotImplementedError  # pragma: no cover

    # -- public API -----------------------------------------------------------------------------

    def expect_external_hessian(self) -> None:
        """Take estimates only from :meth:`update_hessian` from now on: ``step(closure)`` no longer
        estimates from the closure's loss. Called by ``HessianDiagCallback`` when training starts."""
        for group in self.param_groups:
            group["external_hessian"] = True

    @property
    def external_hessian(self) -> bool:
        """True once estimates come from :meth:`update_hessian` (see the module docstring)."""
        return any(g.get("external_hessian", False) for g in self.param_groups)

    def hessian_params(self) -> list[Tensor]:
        """The parameters, in the order a list passed to :meth:`update_hessian` must follow."""
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def update_hessian(self, diag: Sequence[Tensor | None] | Mapping[Tensor, Tensor]) -> None:
        """Fold a Hessian-diagonal estimate into the optimizer's curvature state.

        Args:
            diag: a list aligned with :meth:`hessian_params` (None entries are skipped) or a dict
                ``{parameter: estimate}`` for some of the parameters. Each estimate has the
                parameter's shape. It is the curvature of the objective as minimized (the loss).

        Non-finite estimates follow the optimizer's ``nonfinite`` setting: ``"raise"`` raises
        :class:`~lit_optim.optim.NonFiniteGradientError` and applies nothing, ``"skip"`` ignores the
        whole estimate (counted in ``skipped_hessian_updates``), ``"ignore"`` applies it unchecked.
        """
        self.expect_external_hessian()
        self._feed_hessian(self._pairs(diag))

    # -- internals ------------------------------------------------------------------------------

    def _pairs(self, diag: Sequence[Tensor | None] | Mapping[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        name = type(self).__name__
        params = self.hessian_params()
        if isinstance(diag, Mapping):
            known = {id(p) for p in params}
            pairs = []
            for p, d in diag.items():
                if id(p) not in known:
                    raise ValueError(
                        f"{name}.update_hessian: got an estimate for a tensor of shape {tuple(p.shape)} that is not "
                        "one of this optimizer's parameters"
                    )
                if d is not None:
                    pairs.append((p, d))
        elif isinstance(diag, (list, tuple)):
            if len(diag) != len(params):
                raise ValueError(
                    f"{name}.update_hessian: expected {len(params)} estimates (one per parameter, in the order of "
                    f"optimizer.hessian_params(); None to skip one), got {len(diag)}"
                )
            pairs = [(p, d) for p, d in zip(params, diag) if d is not None]
        else:
            raise TypeError(
                f"{name}.update_hessian expects a list of tensors aligned with the parameters or a dict "
                f"{{param: tensor}}, got {type(diag).__name__}"
            )
        for i, (p, d) in enumerate(pairs):
            if not isinstance(d, Tensor):
                raise TypeError(f"{name}.update_hessian: estimate {i} must be a tensor, got {type(d).__name__}")
            if d.is_sparse:
                raise TypeError(f"{name}.update_hessian: estimate {i} is a sparse tensor; pass dense estimates")
            if torch.is_complex(p) and not self.supports_complex:
                raise TypeError(
                    f"{name} does not support complex parameters (estimate {i}, parameter of shape {tuple(p.shape)}); "
                    "optimize torch.view_as_real(param) instead"
                )
            if tuple(d.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}.update_hessian: estimate {i} has shape {tuple(d.shape)}, its parameter has shape "
                    f"{tuple(p.shape)}"
                )
        return [(p, self._like_param(p, d, i)) for i, (p, d) in enumerate(pairs)]

    def _like_param(self, p: Tensor, d: Tensor, i: int) -> Tensor:
        """An estimate laid out like its parameter: a DTensor estimate must have the parameter's
        mesh and placements; a regular tensor of the full shape given for a DTensor parameter
        (FSDP2) is cut to this rank's shard locally, without communication."""
        name = type(self).__name__
        if _dtensor.is_dtensor(p):
            if _dtensor.is_dtensor(d):
                if tuple(d.placements) != tuple(p.placements) or d.device_mesh != p.device_mesh:
                    raise ValueError(
                        f"{name}.update_hessian: estimate {i} is {_dtensor.describe_placements(d)}, its parameter "
                        f"{_dtensor.describe_placements(p)}; they must match"
                    )
                return d
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(
                d.detach().to(device=_dtensor.local(p).device), p.device_mesh, p.placements, src_data_rank=None
            )
        if _dtensor.is_dtensor(d):
            raise ValueError(
                f"{name}.update_hessian: estimate {i} is {_dtensor.describe_placements(d)} but its parameter is a "
                "regular tensor"
            )
        return d

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _feed_hessian(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        if not pairs:
            return
        groups = self._group_of()
        if any(groups[id(p)]["nonfinite"] != "ignore" for p, _ in pairs):
            # agreed over the shards of DTensor estimates: every rank applies or refuses together
            finite = _dtensor.all_finite([d for _, d in pairs])
            if not finite:
                if all(groups[id(p)]["nonfinite"] != "raise" for p, _ in pairs):
                    self.skipped_hessian_updates += 1
                    return
                bad = next(
                    (p for p, d in pairs if d.numel() and not bool(torch.isfinite(_dtensor.local(d)).all())), None
                )
                where = f"the parameter of shape {tuple(bad.shape)}" if bad is not None else "a shard on another rank"
                raise NonFiniteGradientError(
                    f"{type(self).__name__}.update_hessian: non-finite Hessian estimate (NaN or Inf) for {where}; "
                    "nothing was applied. Check the estimator's loss for overflow, or pass "
                    "nonfinite='skip' to drop such estimates."
                )
        for p, d in pairs:
            group = groups[id(p)]
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                self._init_state(p, state, group)
            # in the dtype of the optimizer state (float32 for float16/bfloat16 parameters)
            self._apply_hessian(group, p, state, d.detach().to(device=p.device, dtype=state_dtype(p)))

    def _current_step(self) -> int:
        return max((int(st.get("step", 0)) for st in self.state.values()), default=0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step.

        Args:
            closure: in closure mode (no estimate ever given through :meth:`update_hessian`), a
                callable returning the loss *without* calling ``backward()``: the optimizer computes
                the gradient and, every ``update_period`` steps, the Hutchinson estimate from it. In
                external mode, an ordinary closure (it may call ``backward()``). The loss is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if not self.external_hessian:
                self._estimate_from_loss(loss)
        self._step_groups()
        return loss

    def _estimate_from_loss(self, loss: Any) -> None:
        name = type(self).__name__
        params = [p for p in self.hessian_params() if p.requires_grad]
        # FSDP2: torch.autograd.grad does not reach sharded parameters (it would return None, and the
        # step would silently do nothing), and no double backward runs through fully_shard
        refuse_sharded_double_backward(params, f"{name}.step(closure) in closure mode")
        group0 = self.param_groups[0]
        step = self._current_step()
        refresh = step % group0["update_period"] == 0
        try:
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise ValueError("the closure's return value is not a loss tensor that requires grad")
            with torch.enable_grad():
                if refresh:
                    grads = differentiable_grads(loss, params)
                else:
                    grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        except (ValueError, RuntimeError) as e:
            raise RuntimeError(
                f"{name}.step(closure) has no Hessian estimate to use: {e}. Either (plain PyTorch) return the loss from "
                "the closure without calling backward() so the optimizer can estimate the Hessian from it, or feed "
                f"estimates with {name}.update_hessian(...) (e.g. from lit_optim.curvature.gnb_diagonal), or (Lightning) "
                "add lit_optim.callbacks.HessianDiagCallback to Trainer(callbacks=[...])."
            ) from e
        diag: list[Tensor | None] = [None] * len(params)
        if refresh:
            n_probes, dist = group0["n_probes"], group0["probe"]
            used = [g for g in grads if g is not None]
            device = used[0].device if used else torch.device("cpu")
            gen = make_generator(probe_seed(group0["seed"], step), device)
            diag = [None if g is None else torch.zeros_like(p) for g, p in zip(grads, params)]
            for s in range(n_probes):
                vs = [None if g is None else probe_like(p, dist, gen) for g, p in zip(grads, params)]
                hv = hessian_vector_product(grads, params, vs, retain_graph=s + 1 < n_probes)
                for d, v, h in zip(diag, vs, hv):
                    if d is not None and h is not None:
                        d.addcmul_(v, h, value=1.0 / n_probes)
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g.detach()
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        del grads
        if refresh:
            self._feed_hessian([(p, d) for p, d in zip(params, diag) if d is not None])
