r"""Shared machinery of the orthogonalized / normalized matrix optimizers (Muon family).

:class:`OrthogonalOptimizer` takes *all* of a model's parameters:

* **Matrix parameters** take the family's update. A parameter is a matrix parameter when its group
  has ``use_muon=True``, or when the group has no ``use_muon`` key and the parameter has >= 2
  dimensions. Its gradient is viewed as a matrix (or a stack of matrices) according to the group's
  ``matrix_view`` (see :func:`matrix_view_shape`): 2-D as is; conv kernels ``(out, in, kh, kw)``
  as ``(out, in*kh*kw)``; 3-D tensors (stacked attention heads or experts) as a batch of matrices,
  each orthogonalized on its own; a 1-D parameter forced with ``use_muon=True`` as a ``1 x n`` row.
* **Other parameters** (``use_muon=False``, or < 2 dims in a group without ``use_muon``) take an
  internal AdamW. In a ``use_muon=False`` group the group's ``lr`` is AdamW's learning rate
  (default ``adam_lr``), ``weight_decay`` its decoupled weight decay (default
  ``adam_weight_decay``), ``adam_betas``/``adam_eps`` (aliases ``betas``/``eps``) its moments.
  In a group without ``use_muon`` the 1-D parameters use ``lr * adam_lr / lr0`` (``lr0`` the
  constructor's ``lr``; stored as ``adam_lr_ratio``) and ``adam_weight_decay``.
  Either way an LR scheduler that scales every group's ``lr`` scales both parts.

Matrices of the same shape go through one batched Newton-Schulz call. Under an initialized
``torch.distributed`` process group with more than one rank (DDP: identical parameters and
gradients on every rank), the Newton-Schulz work is divided among the ranks, each rank
orthogonalizes its share (balanced by flop count) and the results are all-gathered, so the
per-step cost falls with the number of ranks while every rank applies the same update.

``layerwise_noise_adaptive=True`` adds noise-adaptive layerwise learning rates (after
*Noise-Adaptive Layerwise Learning Rates: Accelerating Geometry-Aware Optimization for Deep Neural
Network Training*, Hao, Gong, Xu, Wang & Liu, 2025, arXiv:2510.14009). The paper leaves the
estimator open in its abstract; we use: the noise of matrix :math:`\ell` at step :math:`t` is
:math:`D_t^\ell = G_t^\ell - \hat M_{t-1}^\ell` (gradient minus the bias-corrected momentum before
this step; SinkGD, which has no momentum, keeps a gradient EMA with rate 0.9 for this), its size
is measured in the dual norm of the layer's LMO (nuclear norm for the orthogonalized updates,
estimated as :math:`\langle \mathrm{NS}(D), D\rangle`; Frobenius norm for AuON and SinkGD), and
:math:`H_t^\ell = \beta H_{t-1}^\ell + (1-\beta)\lVert D_t^\ell\rVert_*^2` (bias-corrected, from
step 2 on). Within a parameter group the learning rate of matrix :math:`\ell` is multiplied by
:math:`f^\ell = \mathrm{clip}\big(\sqrt{\bar H_t / H_t^\ell},\ 1/c,\ c\big)` with :math:`\bar H_t`
the geometric mean over the group's matrices and :math:`c` = ``noise_clip``: noisier layers take
smaller steps, quieter ones larger, the group's mean log step unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.newton_schulz import _compute_dtype, ns_flops, orthogonalize, resolve_coefficients
from ._base import (
    FOREACH_OPS,
    LOOP_OPS,
    LitOptimizer,
    TensorListOps,
    check_betas,
    check_choice,
    check_in_range,
    check_lr,
    check_non_negative,
    check_positive,
    check_positive_int,
    group_by_key,
)

__all__ = [
    "ADJUST_LR_MODES",
    "COMMON_ARGS_DOC",
    "MATRIX_VIEWS",
    "OrthogonalOptimizer",
    "lr_adjustment",
    "matrix_view_shape",
    "momentum_defaults",
    "ns_group_defaults",
    "with_common_args_doc",
]

ADJUST_LR_MODES = ("original", "match_rms_adamw", "none")
#: EMA rate of the gradient average kept as noise reference by optimizers without momentum (SinkGD)
_GRAD_EMA_BETA = 0.9
MATRIX_VIEWS = ("auto", "flatten", "batch")

COMMON_ARGS_DOC = """
        adam_lr: learning rate of the internal AdamW for the non-matrix parameters (the ``lr`` of
            ``use_muon=False`` groups that set none; for groups without ``use_muon`` it is kept as
            the ratio ``adam_lr / lr`` so that schedules scale it too).
        adam_betas: AdamW's :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.95)).
        adam_eps: AdamW's :math:`\\epsilon` (default 1e-10).
        adam_weight_decay: AdamW's decoupled weight decay (default 0).
        layerwise_noise_adaptive: multiply each matrix's learning rate by the noise-adaptive
            layerwise factor (see :mod:`lit_optim.optim._orthogonal`; default False).
        noise_beta: EMA rate of the squared dual-norm noise estimate (default 0.99).
        noise_clip: the layerwise factors are clipped to ``[1/noise_clip, noise_clip]`` (default 4).
        distributed: divide the Newton-Schulz work among the ranks of the default process group;
            None (default) does so when ``torch.distributed`` is initialized with more than one
            rank (DDP). It assumes identical parameters and gradients on every rank.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`
            (``foreach=False`` also orthogonalizes matrices one by one instead of batched).
"""


def with_common_args_doc(cls: type) -> type:
    """Append the documentation of the family's shared constructor arguments to ``cls.__doc__``."""
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + COMMON_ARGS_DOC
    return cls


def matrix_view_shape(shape: Sequence[int], view: str = "auto") -> tuple[int, ...]:
    """Shape ``(m, n)`` or ``(B, m, n)`` under which a parameter of ``shape`` is updated.

    * ``"auto"``: 0-D -> (1, 1); 1-D -> (1, n); 2-D as is; 3-D -> a batch of matrices
      (stacked heads/experts); >= 4-D (conv kernels) -> ``(shape[0], prod(shape[1:]))``.
    * ``"flatten"``: >= 2-D -> ``(shape[0], prod(shape[1:]))`` (use for Conv1d kernels).
    * ``"batch"``: >= 3-D -> ``(prod(shape[:-2]), shape[-2], shape[-1])``.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd == 0:
        return (1, 1)
    if nd == 1:
        return (1, shape[0])
    if nd == 2:
        return shape
    if view == "flatten" or (view == "auto" and nd >= 4):
        return (shape[0], math.prod(shape[1:]))
    return (math.prod(shape[:-2]), shape[-2], shape[-1])


def lr_adjustment(m: int, n: int, mode: str) -> float:
    """Shape-dependent learning-rate factor for an ``m x n`` (out x in) matrix update.

    * ``"original"``: :math:`\\sqrt{\\max(1, m/n)}` (Keller Jordan's Muon).
    * ``"match_rms_adamw"``: :math:`0.2\\sqrt{\\max(m, n)}`: an orthogonal update then has RMS 0.2,
      about AdamW's, so AdamW's learning rate and weight decay carry over (Moonlight,
      *Muon is Scalable for LLM Training*, Liu et al., 2025).
    * ``"none"``: 1.
    """
    if mode == "original":
        return math.sqrt(max(1.0, m / max(n, 1)))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


def _state_dtype(p: Tensor) -> torch.dtype:
    """Statistics (sums of squares, second moments) of half-precision parameters are kept in fp32."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(p, DTensor)


def _greedy_assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest first onto the least-loaded rank (deterministic)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


#: keyword arguments every orthogonalized optimizer takes and hands unchanged to OrthogonalOptimizer
SHARED_KWARGS = (
    "adam_lr",
    "adam_betas",
    "adam_eps",
    "adam_weight_decay",
    "adjust_lr",
    "layerwise_noise_adaptive",
    "noise_beta",
    "noise_clip",
    "distributed",
    "maximize",
    "foreach",
    "nonfinite",
)


def shared_kwargs(namespace: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SHARED_KWARGS` out of a subclass constructor's ``locals()`` (each subclass keeps the
    explicit signature, for documentation, introspection and LightningCLI, and forwards them)."""
    return {k: namespace[k] for k in SHARED_KWARGS}


class OrthogonalOptimizer(LitOptimizer):
    """Base class: whole-model handling, batching, distribution and noise adaptivity.

    Subclasses implement :meth:`_init_matrix_state`, :meth:`_matrix_inputs` (the elementwise part
    before the matrix function, e.g. momentum), :meth:`_transform` (the matrix function; use
    :meth:`_orthogonalize` for Newton-Schulz, which is batched and shared between ranks) and
    :meth:`_finish` (scaling of the resulting directions).
    """

    #: dual norm of the LMO, for the noise-adaptive layerwise rates: "nuclear" or "frobenius"
    lmo_dual_norm: str = "nuclear"
    #: state key of the momentum buffer used as the noise reference (None: keep a gradient EMA)
    momentum_key: str | None = "momentum_buffer"
    #: statistics of the last step: matrices Newton-Schulz was applied to in total (``matrices``),
    #: on this rank (``local_matrices``), and the number of ranks sharing the work (``world_size``)
    last_ns_stats: dict[str, int]

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        adam_lr: float,
        adam_betas: tuple[float, float],
        adam_eps: float,
        adam_weight_decay: float,
        adjust_lr: str,
        layerwise_noise_adaptive: bool,
        noise_beta: float,
        noise_clip: float,
        distributed: bool | None,
        maximize: bool,
        foreach: bool | None,
        nonfinite: str,
    ):
        lr = check_lr(defaults["lr"])
        adam_lr = check_lr(adam_lr, "adam_lr")
        if lr == 0.0 and adam_lr != 0.0:
            raise ValueError(
                f"adam_lr is kept relative to lr for parameters in groups without use_muon, so lr must be > 0 "
                f"when adam_lr != 0, got lr=0 and adam_lr={adam_lr!r}"
            )
        if not isinstance(layerwise_noise_adaptive, bool):
            raise TypeError(f"layerwise_noise_adaptive must be a bool, got {layerwise_noise_adaptive!r}")
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
        defaults = dict(
            defaults,
            lr=lr,
            adam_lr_ratio=(adam_lr / lr) if lr > 0 else 0.0,
            adam_betas=check_betas(adam_betas, 2, "adam_betas"),
            adam_eps=check_non_negative("adam_eps", adam_eps),
            adam_weight_decay=check_non_negative("adam_weight_decay", adam_weight_decay),
            adjust_lr=check_choice("adjust_lr", adjust_lr, ADJUST_LR_MODES),
            layerwise_noise_adaptive=layerwise_noise_adaptive,
            noise_beta=check_in_range("noise_beta", noise_beta, 0.0, 1.0, high_closed=False),
            noise_clip=check_in_range("noise_clip", noise_clip, 1.0, math.inf, high_closed=False),
            matrix_view="auto",
            distributed=distributed,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)
        self.last_ns_stats = {"matrices": 0, "local_matrices": 0, "world_size": 1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "last_ns_stats"):
            self.last_ns_stats = {"matrices": 0, "local_matrices": 0, "world_size": 1}

    # ------------------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        use_muon = group.get("use_muon", None)
        if use_muon is not None and not isinstance(use_muon, bool):
            raise TypeError(f"use_muon must be True, False or absent, got {use_muon!r}")
        if "use_muon" in group and use_muon is None:
            del group["use_muon"]
        view = group.get("matrix_view", "auto")
        check_choice("matrix_view", view, MATRIX_VIEWS)
        if use_muon is False:
            for alias, key in (("betas", "adam_betas"), ("eps", "adam_eps")):
                if alias in group:
                    if key in group:
                        raise ValueError(f"a use_muon=False group sets both {alias!r} and {key!r}")
                    group[key] = group.pop(alias)
            if "lr" not in group:
                group["lr"] = self.defaults["lr"] * self.defaults["adam_lr_ratio"]
            if "weight_decay" not in group:
                group["weight_decay"] = self.defaults["adam_weight_decay"]
        for key, check in (("lr", check_lr), ("weight_decay", lambda v: check_non_negative("weight_decay", v))):
            if key in group:
                group[key] = check(group[key])
        if "adam_betas" in group:
            group["adam_betas"] = check_betas(group["adam_betas"], 2, "adam_betas")
        super().add_param_group(group)

    def _is_matrix(self, p: Tensor, group: dict[str, Any]) -> bool:
        use_muon = group.get("use_muon", None)
        if use_muon is None:
            return p.ndim >= 2
        return bool(use_muon)

    def _view(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return matrix_view_shape(p.shape, group.get("matrix_view", "auto"))

    # ------------------------------------------------------------------------------ state

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if self._is_matrix(p, group):
            self._init_matrix_state(p, state, group)
        else:
            self._init_adam_state(p, state)

    def _init_adam_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_matrix_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create the matrix state (default: a momentum buffer like ``p``)."""
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _matrix_state_ready(self, state: dict[str, Any]) -> bool:
        return "momentum_buffer" in state if self.momentum_key else True

    def _ensure_noise_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "noise_sq" not in state:
            view = self._view(p, group)
            shape = view[:1] if len(view) == 3 else ()
            state["noise_sq"] = torch.zeros(shape, dtype=_state_dtype(p), device=p.device)
            state["noise_count"] = 0
        if self.momentum_key is None and "grad_ema" not in state:
            state["grad_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but statistics kept in float32 for
        half-precision parameters (``noise_sq``, ``sum_sq``, ``second_moment``) stay float32
        instead of being cast to the parameter's dtype, so that a resumed run continues exactly."""
        keep: dict[int, dict[str, Tensor]] = {}
        saved_groups = state_dict.get("param_groups", [])
        ids = [pid for g in saved_groups for pid in g["params"]]
        for pid in ids:
            st = state_dict.get("state", {}).get(pid)
            if not st:
                continue
            keep[pid] = {k: v.clone() for k, v in st.items() if isinstance(v, Tensor) and k in self._fp32_keys}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in keep.get(pid, {}).items():
                if p in self.state and k in self.state[p]:
                    self.state[p][k] = v.to(device=p.device, dtype=_state_dtype(p))

    _fp32_keys = ("noise_sq", "sum_sq", "second_moment")

    # ------------------------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        states = self._prepare_states(group, params)
        foreach = group["foreach"] is None or group["foreach"]
        ops = FOREACH_OPS if foreach else LOOP_OPS
        mat = [i for i, p in enumerate(params) if self._is_matrix(p, group)]
        mat_set = set(mat)
        adam = [i for i in range(len(params)) if i not in mat_set]
        if adam:
            ps = [params[i] for i in adam]
            for i, p in zip(adam, ps):
                if "exp_avg" not in states[i]:
                    self._init_adam_state(p, states[i])
            if "use_muon" in group:
                lr, wd = group["lr"], group["weight_decay"]
            else:
                lr, wd = group["lr"] * group["adam_lr_ratio"], group["adam_weight_decay"]
            self._adam_step(group, ps, [grads[i] for i in adam], [states[i] for i in adam], lr, wd, foreach)
        if mat:
            for i in mat:
                if not self._matrix_state_ready(states[i]):
                    self._init_matrix_state(params[i], states[i], group)
            self._matrix_step(
                group, [params[i] for i in mat], [grads[i] for i in mat], [states[i] for i in mat], ops, foreach
            )

    def _adam_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lr: float,
        wd: float,
        foreach: bool,
    ) -> None:
        beta1, beta2 = group["adam_betas"]
        eps = group["adam_eps"]
        if foreach:
            buckets = list(
                group_by_key(len(params), lambda i: (params[i].device, params[i].dtype, states[i]["step"])).values()
            )
            ops: TensorListOps = FOREACH_OPS
        else:
            buckets = [[i] for i in range(len(params))]
            ops = LOOP_OPS
        for idx in buckets:
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            m = [states[i]["exp_avg"] for i in idx]
            v = [states[i]["exp_avg_sq"] for i in idx]
            step = states[idx[0]]["step"]
            ops.lerp_(m, gs, 1.0 - beta1)
            ops.mul_(v, beta2)
            ops.addcmul_(v, gs, gs, 1.0 - beta2)
            bc1 = 1.0 - beta1**step
            bc2 = 1.0 - beta2**step
            denom = ops.sqrt(v)
            ops.mul_(denom, 1.0 / math.sqrt(bc2))
            ops.add_(denom, eps)
            if wd != 0.0:
                ops.mul_(ps, 1.0 - lr * wd)
            ops.addcdiv_(ps, m, denom, -lr / bc1)

    def _matrix_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        ops: TensorListOps,
        foreach: bool,
    ) -> None:
        for p in params:
            if _is_dtensor(p):
                raise TypeError(
                    f"{type(self).__name__}: a matrix parameter of shape {tuple(p.shape)} is a sharded DTensor "
                    "(FSDP2 / tensor parallelism); the orthogonalized family needs whole matrices on every rank: "
                    "use DDP (strategy='ddp'), whose Newton-Schulz work it shares between the ranks"
                )
        views = [self._view(p, group) for p in params]
        noise_mats: list[Tensor] | None = None
        if group["layerwise_noise_adaptive"]:
            for p, st in zip(params, states):
                self._ensure_noise_state(p, st, group)
            key = self.momentum_key or "grad_ema"
            beta = group["momentum"] if self.momentum_key else _GRAD_EMA_BETA
            noise_mats = []
            for g, st, v in zip(grads, states, views):
                # bias-corrected reference: the momentum has seen step - 1 gradients
                seen = st["step"] - 1
                ref = st[key] / (1.0 - beta**seen) if seen > 0 else torch.zeros_like(g)
                noise_mats.append((g - ref).reshape(v))
            if self.momentum_key is None:
                ops.lerp_([st[key] for st in states], grads, 1.0 - _GRAD_EMA_BETA)
        inputs = self._matrix_inputs(group, params, grads, states, ops)
        mats = [x.reshape(v) for x, v in zip(inputs, views)]
        noise_norms: list[Tensor] | None = None
        if noise_mats is not None and self.lmo_dual_norm == "nuclear":
            outs, extra = self._transform(group, mats, foreach, extra=noise_mats)
            noise_norms = [(o.to(d.dtype) * d).sum(dim=(-2, -1)) for o, d in zip(extra, noise_mats)]
        else:
            outs, _ = self._transform(group, mats, foreach)
            if noise_mats is not None:
                noise_norms = [torch.linalg.vector_norm(d, dim=(-2, -1)) for d in noise_mats]
        dirs = self._finish(group, params, grads, states, mats, outs)
        factors: list[Tensor | float] = [1.0] * len(params)
        if noise_norms is not None:
            factors = self._noise_factors(group, states, noise_norms, [m.numel() > 0 for m in mats])
        lr = group["lr"]
        wd = group["weight_decay"]
        if wd != 0.0:
            ops.mul_(params, 1.0 - lr * wd)
        # one add per matrix: the shape factor goes into alpha, the direction is added in its own
        # dtype and layout (no scaled or cast copy)
        for p, d, (m, n), f in zip(params, dirs, [v[-2:] for v in views], factors):
            if isinstance(f, Tensor):
                d = d * f.to(d.dtype).reshape(f.shape + (1, 1))
            p.add_(d.reshape(p.shape), alpha=-lr * lr_adjustment(m, n, group["adjust_lr"]))

    def _noise_factors(
        self, group: dict[str, Any], states: list[dict[str, Any]], norms: list[Tensor], nonempty: list[bool]
    ) -> list[Tensor | float]:
        beta = group["noise_beta"]
        est: list[Tensor | None] = []
        for st, nrm, ok in zip(states, norms, nonempty):
            h = st["noise_sq"]
            if st["step"] >= 2:
                h.mul_(beta).add_(nrm.to(h.dtype).square(), alpha=1.0 - beta)
                st["noise_count"] += 1
            if st["noise_count"] > 0 and ok and h.numel() > 0:
                est.append(h / (1.0 - beta ** st["noise_count"]))
            else:
                est.append(None)
        valid = [e for e in est if e is not None]
        if not valid:
            return [1.0] * len(states)
        dev = valid[0].device
        logs = torch.cat([e.to(dev, torch.float64).reshape(-1).clamp_min(1e-300).log() for e in valid])
        log_ref = logs.mean()
        clip = group["noise_clip"]
        out: list[Tensor | float] = []
        for e in est:
            if e is None:
                out.append(1.0)
                continue
            f = torch.exp(0.5 * (log_ref.to(e.device) - e.to(torch.float64).clamp_min(1e-300).log()))
            out.append(f.clamp(1.0 / clip, clip))
        return out

    # ------------------------------------------------------------------------------ hooks

    def _matrix_inputs(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        ops: TensorListOps,
    ) -> list[Tensor]:
        """Elementwise part before the matrix function; returns tensors shaped like the params.
        Default: momentum :math:`M \\leftarrow \\mu M + (1-\\mu) G`, then Nesterov
        :math:`(1-\\mu)G + \\mu M` or :math:`M`."""
        mom = group["momentum"]
        bufs = [st["momentum_buffer"] for st in states]
        ops.lerp_(bufs, grads, 1.0 - mom)
        if group["nesterov"]:
            return ops.lerp(grads, bufs, mom)
        return bufs

    def _transform(
        self, group: dict[str, Any], mats: list[Tensor], foreach: bool, extra: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The matrix function applied to ``mats`` (and, orthogonalized the same way, to ``extra``,
        the noise matrices whose nuclear norm is wanted). Default: Newton-Schulz."""
        return self._orthogonalize(group, mats, foreach, extra=extra)

    def _finish(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        mats: list[Tensor],
        outs: list[Tensor],
    ) -> list[Tensor]:
        """Directions (matrix-shaped) the parameters move along, before ``lr`` and the shape factor."""
        return outs

    # ------------------------------------------------------------------------------ Newton-Schulz

    def _ns_settings(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": group["ns_steps"],
            "coefficients": group["ns_coefficients"],
            "eps": group["ns_eps"],
            "dtype": group["ns_dtype"],
            "method": group["ns_method"],
        }

    def _orthogonalize(
        self,
        group: dict[str, Any],
        mats: list[Tensor],
        foreach: bool,
        extra: list[Tensor] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Newton-Schulz of ``mats + extra`` with the group's settings: batched by shape when
        ``foreach``, and divided among the ranks under DDP."""
        settings = settings or self._ns_settings(group)
        work = list(mats) + list(extra or [])
        stats = self.last_ns_stats
        if self._distributed(group):
            res, local = self._distributed_orthogonalize(work, settings, foreach)
            stats["world_size"] = dist.get_world_size()
        else:
            # contiguous results: later reductions then round the same way on every rank
            res, local = [r.contiguous() for r in orthogonalize(work, batched=foreach, **settings)], len(work)
        stats["matrices"] = stats.get("matrices", 0) + len(work)
        stats["local_matrices"] = stats.get("local_matrices", 0) + local
        return res[: len(mats)], res[len(mats) :]

    def _step_groups(self) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.last_ns_stats = {"matrices": 0, "local_matrices": 0, "world_size": world}
        super()._step_groups()

    def _distributed(self, group: dict[str, Any]) -> bool:
        flag = group.get("distributed", None)
        if flag is False:
            return False
        ok = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if flag is True and not ok:
            return False
        return ok

    def _distributed_orthogonalize(
        self, work: list[Tensor], settings: dict[str, Any], foreach: bool
    ) -> tuple[list[Tensor], int]:
        world, rank = dist.get_world_size(), dist.get_rank()
        steps, method = settings["steps"], settings["method"]
        costs = []
        for x in work:
            b = x.shape[0] if x.ndim == 3 else 1
            cdt = _compute_dtype(x, settings["dtype"])
            costs.append(float(b * ns_flops(x.shape[-2], x.shape[-1], steps, method, cdt)) + 1.0)
        # every rank must hold the same list of matrices; compare a signature before exchanging
        sig = torch.tensor(
            [len(work), sum(x.numel() for x in work), hash(tuple(tuple(x.shape) for x in work)) % (2**61)],
            dtype=torch.int64,
        )
        device = work[0].device if work else torch.device("cpu")
        backend_device = device if dist.get_backend() != "gloo" else torch.device("cpu")
        sig = sig.to(backend_device)
        sigs = [torch.empty_like(sig) for _ in range(world)]
        dist.all_gather(sigs, sig)
        if any(not torch.equal(s, sigs[0]) for s in sigs):
            raise RuntimeError(
                "distributed Newton-Schulz: the ranks hold different matrices to orthogonalize (different "
                "parameters or gradients present); pass distributed=False when the ranks do not hold "
                "replicated parameters (e.g. FSDP or model parallelism)"
            )
        owner = _greedy_assign(costs, world)
        dtypes = [_compute_dtype(x, settings["dtype"]) for x in work]
        mine = [i for i in range(len(work)) if owner[i] == rank]
        local = orthogonalize([work[i] for i in mine], batched=foreach, **settings)
        results: list[Tensor | None] = [None] * len(work)
        for i, r in zip(mine, local):
            results[i] = r.contiguous()
        for dt in sorted(set(dtypes), key=str):
            per_rank = [[i for i in range(len(work)) if owner[i] == r and dtypes[i] == dt] for r in range(world)]
            sizes = [sum(work[i].numel() for i in items) for items in per_rank]
            total = max(sizes)
            if total == 0:
                continue
            flat = torch.zeros(total, dtype=dt, device=backend_device)
            off = 0
            for i in per_rank[rank]:
                n = work[i].numel()
                flat[off : off + n].copy_(results[i].reshape(-1))  # type: ignore[union-attr]
                off += n
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            for r in range(world):
                if r == rank:
                    continue
                off = 0
                for i in per_rank[r]:
                    n = work[i].numel()
                    results[i] = gathered[r][off : off + n].to(device).reshape(work[i].shape)
                    off += n
        return results, len(mine)  # type: ignore[return-value]


def ns_group_defaults(
    ns_steps: int, ns_coefficients: Any, ns_eps: float, ns_dtype: Any, ns_method: str
) -> dict[str, Any]:
    """Validated Newton-Schulz settings stored in each parameter group."""
    check_positive_int("ns_steps", ns_steps)
    resolve_coefficients(ns_coefficients, 4, 8)  # raises on a bad preset or triple
    if isinstance(ns_coefficients, list):
        ns_coefficients = [tuple(t) for t in ns_coefficients]
    if ns_dtype is not None:
        _compute_dtype(torch.zeros(()), ns_dtype)
        if isinstance(ns_dtype, torch.dtype):
            ns_dtype = str(ns_dtype).replace("torch.", "")
    return {
        "ns_steps": ns_steps,
        "ns_coefficients": ns_coefficients,
        "ns_eps": check_positive("ns_eps", ns_eps),
        "ns_dtype": ns_dtype,
        "ns_method": check_choice("ns_method", ns_method, ("auto", "standard", "gram")),
    }


def momentum_defaults(momentum: float, nesterov: bool) -> dict[str, Any]:
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    return {"momentum": check_in_range("momentum", momentum, 0.0, 1.0, high_closed=False), "nesterov": nesterov}
