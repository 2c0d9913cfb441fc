r"""Shared machinery of the orthogonalized / normalized matrix optimizers (Muon family).

:class:`OrthogonalOptimizer` takes *all* of a model's parameters:

* **Matrix parameters** take the family's update. A parameter is a matrix parameter when its group
  has ``use_muon=True``, or when the group has no ``use_muon`` key and the parameter has >= 2
  dimensions. Its gradient is viewed as a matrix (or a stack of matrices) according to the group's
  ``matrix_view`` (see :func:`matrix_view_shape`): 2-D as is; conv kernels ``(out, in, kh, kw)``
  as ``(out, in*kh*kw)``; 3-D tensors (stacked attention heads or experts) as a batch of matrices,
  each orthogonalized on its own; a 1-D parameter forced with ``use_muon=True`` as a ``1 x n`` row.
* **Other parameters** (``use_muon=False``, or < 2 dims in a group without ``use_muon``) take an
  internal AdamW with ``adam_betas``/``adam_eps`` (in ``use_muon=False`` groups also spelled
  ``betas``/``eps``).

**Learning rate of the internal AdamW** (one rule for every group): the non-matrix parameters of a
group step with ``lr * adam_lr_ratio``, where ``adam_lr_ratio = adam_lr / lr`` is fixed when the
group is added, from the group's own ``lr`` and ``adam_lr`` (each defaulting to the constructor's).
So AdamW starts at exactly the group's ``adam_lr`` (else the constructor's), whatever ``lr`` the
group sets, and an LR scheduler that scales ``lr`` scales AdamW's rate by the same factor. In a
``use_muon=False`` group ``lr`` *is* AdamW's rate (``adam_lr_ratio = 1``; a group may give it as
``lr`` or ``adam_lr``, default the constructor's ``adam_lr``), and ``weight_decay`` its decoupled
weight decay (default ``adam_weight_decay``); in other groups the AdamW part uses the group's
``adam_weight_decay``. A group whose ``lr`` is 0 while its ``adam_lr`` is not is refused (the
ratio would be undefined).

**Distribution.** Matrices of the same shape go through one batched Newton-Schulz call, and the
whole-matrix work is divided among ranks by owner (:mod:`lit_optim.optim._distributed`; owners
balanced by Newton-Schulz flops, the same assignment code for both cases):

* *DDP* (regular tensors, identical on every rank; ``distributed=None`` turns this on when
  ``torch.distributed`` is initialized with more than one rank): each rank orthogonalizes the
  matrices it owns and the results are all-gathered, so the per-step cost falls with the number of
  ranks while every rank applies the same update.
* *FSDP2* (DTensor parameters sharded on dim 0: ``fully_shard``'s ``(Shard(0),)`` on a 1-D mesh,
  or HSDP's ``(Replicate(), Shard(0))``; uneven and empty shards included): the elementwise parts
  (momentum, the internal AdamW, the noise EMAs, weight decay, the final add) run on the local
  shards. Each matrix's inputs are sent to its owner rank with one ``all_to_all_single``, the
  owner applies the whole matrix function (Newton-Schulz, batched over its same-shape matrices,
  and everything that needs whole rows or columns: NorMuon's neuron-wise moments, SinkGD's
  normalizations, AuON's norms and cosh-RMS, ROOT's outlier threshold, AdaGO's gradient norm, the
  noise norms), and a second ``all_to_all_single`` returns each rank its rows of the result
  together with the updated per-matrix statistics. Every matrix byte crosses the network at most
  once each way: for Muon about ``2 (W-1)/W`` times the bytes of float32 matrix parameters per
  step, summed over the ``W`` ranks (``last_ns_stats`` records this rank's bytes; bf16 parameters
  get their direction back in float32, the precision a one-process step adds it in). The result equals the
  one-process update to float rounding; the ``distributed`` flag does not apply (sharded matrices
  always go through their owners).
* *Other placements* of a matrix parameter (tensor-parallel ``Shard(1)``, sharding over two mesh
  dimensions, ``Partial``) are refused with a ``TypeError`` naming the supported ones; a fully
  replicated DTensor is updated whole on every rank. Non-matrix parameters may have any placement
  (AdamW is elementwise).

**State under FSDP2.** State shaped like the parameter (momentum, AdamW's moments, SinkGD's noise
EMA) is created with ``torch.zeros_like`` on the parameter, so it is a DTensor with the parameter's
placement (``torch.distributed.checkpoint`` saves it sharded). Per-matrix statistics that are not
shaped like the parameter (NorMuon's per-row ``second_moment``, AdaGO's ``sum_sq``, the noise
estimate ``noise_sq``) are regular tensors *replicated* on every rank: the owner updates them and
sends the new values to the other ranks with the result, so every rank holds identical values and
the same state keys (a distributed checkpoint stores one copy; they are O(rows) per matrix, next to
the O(rows x cols / W) of the sharded momentum). All state is created when the optimizer is built.

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

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.newton_schulz import _compute_dtype, orthogonalize, resolve_coefficients
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
from ._distributed import (
    RowSharding,
    assign_owners,
    exchange,
    from_bytes,
    matrix_cost,
    nbytes,
    row_sharding,
    to_bytes,
)
from ._dtensor import is_dtensor, local

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
        adam_lr: learning rate of the internal AdamW for the non-matrix parameters, at the
            group's initial ``lr`` (a group may set its own ``adam_lr``); AdamW then steps with
            ``lr * adam_lr_ratio``, ``adam_lr_ratio = adam_lr / lr`` fixed when the group is added,
            so schedulers scale both parts (see :mod:`lit_optim.optim._orthogonal`).
        adam_betas: AdamW's :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.95)).
        adam_eps: AdamW's :math:`\\epsilon` (default 1e-10).
        adam_weight_decay: AdamW's decoupled weight decay (default 0).
        layerwise_noise_adaptive: multiply each matrix's learning rate by the noise-adaptive
            layerwise factor (see :mod:`lit_optim.optim._orthogonal`; default False).
        noise_beta: EMA rate of the squared dual-norm noise estimate (default 0.99).
        noise_clip: the layerwise factors are clipped to ``[1/noise_clip, noise_clip]`` (default 4).
        distributed: for regular (replicated, DDP) parameters, divide the Newton-Schulz work among
            the ranks of the default process group; None (default) does so when
            ``torch.distributed`` is initialized with more than one rank. It assumes identical
            parameters and gradients on every rank. FSDP2 (DTensor ``Shard(0)``) matrices are
            always transformed whole on an owner rank, whatever this flag says.
        maximize, foreach, nonfinite: see :class:`~lit_optim.optim.LitOptimizer`
            (``foreach=False`` also orthogonalizes matrices one by one instead of batched: the
            results then differ by the rounding of batched vs single matrix products; the
            elementwise parts, and AuON and SinkGD entirely, are bit-identical on both paths in
            every dtype).
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


def _mul_scalar_(ops: TensorListOps, xs: list[Tensor], scalar: float) -> None:
    """``x *= scalar`` for every ``x`` in ``xs``, rounding like ``Tensor.mul_`` on both paths (see
    :meth:`TensorListOps.mul_`, which takes the float32-scalar overload for half-precision lists)."""
    ops.mul_(xs, scalar)


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
    before the matrix function, e.g. momentum; it runs on local shards under FSDP2, so it must be
    elementwise), :meth:`_transform` (the matrix function on whole matrices; use
    :meth:`_orthogonalize` for Newton-Schulz, which is batched and shared between ranks) and
    :meth:`_finish` (scaling of the resulting directions, on whole matrices). Per-matrix
    statistics that :meth:`_finish` updates are named in :attr:`matrix_stat_keys`.
    """

    needs_matrix_shapes = True
    refuses_float16 = True

    #: DTensor parameters are handled (see the module docstring for the supported placements)
    supports_dtensor = True
    #: dual norm of the LMO, for the noise-adaptive layerwise rates: "nuclear" or "frobenius"
    lmo_dual_norm: str = "nuclear"
    #: state key of the momentum buffer used as the noise reference (None: keep a gradient EMA)
    momentum_key: str | None = "momentum_buffer"
    #: state tensors (not shaped like the parameter) that :meth:`_finish` updates in place; under
    #: FSDP2 they are replicated on every rank and sent from the matrix's owner to the others
    matrix_stat_keys: tuple[str, ...] = ()
    #: :meth:`_finish` reads the gradient (under FSDP2 the whole gradient is then sent to the owner)
    finish_needs_grad: bool = False
    #: statistics of the last step: matrices Newton-Schulz was applied to in total (``matrices``),
    #: on this rank (``local_matrices``), the number of ranks sharing the work (``world_size``) and
    #: the bytes this rank sent and received for it (``sent_bytes``, ``received_bytes``)
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
        if not isinstance(layerwise_noise_adaptive, bool):
            raise TypeError(f"layerwise_noise_adaptive must be a bool, got {layerwise_noise_adaptive!r}")
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
        defaults = dict(
            defaults,
            lr=lr,
            adam_lr=adam_lr,
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
        self._ns_mode = "auto"
        self.last_ns_stats = self._fresh_stats(1)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, nonfinite=nonfinite)

    @staticmethod
    def _fresh_stats(world: int) -> dict[str, int]:
        return {"matrices": 0, "local_matrices": 0, "world_size": world, "sent_bytes": 0, "received_bytes": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "last_ns_stats"):
            self.last_ns_stats = self._fresh_stats(1)
        self._ns_mode = "auto"

    # ------------------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`LitOptimizer.add_param_group`, plus the family's group keys: ``use_muon``,
        ``matrix_view``, and the internal AdamW's learning rate (``adam_lr``, kept as
        ``adam_lr_ratio``; see :mod:`lit_optim.optim._orthogonal` for the rule)."""
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
        for key, check in (("lr", check_lr), ("weight_decay", lambda v: check_non_negative("weight_decay", v))):
            if key in group:
                group[key] = check(group[key])
        if "adam_lr" in group:
            group["adam_lr"] = check_lr(group["adam_lr"], "adam_lr")
        if use_muon is False:
            for alias, key in (("betas", "adam_betas"), ("eps", "adam_eps"), ("lr", "adam_lr")):
                if alias in group and key in group and (alias != "lr" or group[alias] != group[key]):
                    raise ValueError(f"a use_muon=False group sets both {alias!r} and {key!r}")
            for alias, key in (("betas", "adam_betas"), ("eps", "adam_eps")):
                if alias in group:
                    group[key] = group.pop(alias)
            lr = group.get("lr", group.get("adam_lr", self.defaults["adam_lr"]))
            group["lr"] = group["adam_lr"] = lr
            group["adam_lr_ratio"] = 1.0
            if "weight_decay" not in group:
                group["weight_decay"] = self.defaults["adam_weight_decay"]
        else:
            lr = group.get("lr", self.defaults["lr"])
            adam_lr = group.get("adam_lr", self.defaults["adam_lr"])
            if lr == 0.0 and adam_lr != 0.0 and use_muon is None:
                raise ValueError(
                    "the internal AdamW's learning rate is kept relative to lr (adam_lr_ratio = adam_lr / lr) for "
                    f"parameters in groups without use_muon, so lr must be > 0 when adam_lr != 0, got lr=0 and "
                    f"adam_lr={adam_lr!r}"
                )
            group["adam_lr"] = adam_lr
            group["adam_lr_ratio"] = adam_lr / lr if lr > 0 else 0.0
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
            row_sharding(p, type(self).__name__)  # refuses unsupported DTensor placements at once
            self._init_matrix_state(p, state, group)
            if group["layerwise_noise_adaptive"]:
                self._ensure_noise_state(p, state, group)
        else:
            self._init_adam_state(p, state)

    def _init_adam_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_matrix_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create the matrix state (default: a momentum buffer like ``p``; for a DTensor ``p`` a
        DTensor with its placement). State not shaped like ``p`` must be a regular tensor (it is
        replicated under FSDP2) and named in :attr:`matrix_stat_keys` when :meth:`_finish`
        updates it."""
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

    @staticmethod
    def _local_state(state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with DTensors replaced by their local shards (sharing storage, so in-place
        updates reach the state); ``state`` itself when it holds no DTensor."""
        if not any(is_dtensor(v) for v in state.values()):
            return state
        return {k: local(v) if is_dtensor(v) else v for k, v in state.items()}

    # ------------------------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = self._prepare_states(group, params)
        # DTensor parameters (FSDP2): every elementwise part runs on the local shards, in place
        lparams = [local(p) for p in params]
        lgrads = [local(g) for g in grads]
        if group["maximize"]:
            lgrads = torch._foreach_neg(lgrads)
        foreach = group["foreach"] is None or group["foreach"]
        ops = FOREACH_OPS if foreach else LOOP_OPS
        mat = [i for i, p in enumerate(params) if self._is_matrix(p, group)]
        mat_set = set(mat)
        adam = [i for i in range(len(params)) if i not in mat_set]
        if adam:
            for i in adam:
                if "exp_avg" not in states[i]:
                    self._init_adam_state(params[i], states[i])
            lr = group["lr"] * group["adam_lr_ratio"]
            wd = group["weight_decay"] if group.get("use_muon", None) is False else group["adam_weight_decay"]
            self._adam_step(
                group,
                [lparams[i] for i in adam],
                [lgrads[i] for i in adam],
                [self._local_state(states[i]) for i in adam],
                lr,
                wd,
                foreach,
            )
        if mat:
            for i in mat:
                if not self._matrix_state_ready(states[i]):
                    self._init_matrix_state(params[i], states[i], group)
            self._matrix_step(
                group,
                [params[i] for i in mat],
                [lparams[i] for i in mat],
                [lgrads[i] for i in mat],
                [states[i] for i in mat],
                ops,
                foreach,
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
            _mul_scalar_(ops, v, beta2)
            ops.addcmul_(v, gs, gs, 1.0 - beta2)
            bc1 = 1.0 - beta1**step
            bc2 = 1.0 - beta2**step
            denom = ops.sqrt(v)
            _mul_scalar_(ops, denom, 1.0 / math.sqrt(bc2))
            ops.add_(denom, eps)
            if wd != 0.0:
                _mul_scalar_(ops, ps, 1.0 - lr * wd)
            ops.addcdiv_(ps, m, denom, -lr / bc1)

    def _matrix_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        lparams: list[Tensor],
        lgrads: list[Tensor],
        states: list[dict[str, Any]],
        ops: TensorListOps,
        foreach: bool,
    ) -> None:
        """One step of the matrix parameters ``params`` (regular tensors or DTensors), whose local
        tensors are ``lparams`` / ``lgrads`` (the same tensors for regular parameters)."""
        name = type(self).__name__
        n = len(params)
        shardings = [row_sharding(p, name) for p in params]
        views = [self._view(p, group) for p in params]
        noise = group["layerwise_noise_adaptive"]
        if noise:
            for p, st in zip(params, states):
                self._ensure_noise_state(p, st, group)
        lstates = [self._local_state(st) for st in states]
        noise_l: list[Tensor] | None = None
        if noise:
            key = self.momentum_key or "grad_ema"
            beta = group["momentum"] if self.momentum_key else _GRAD_EMA_BETA
            noise_l = []
            for g, st in zip(lgrads, lstates):
                # bias-corrected reference: the momentum has seen step - 1 gradients
                seen = st["step"] - 1
                ref = st[key] / (1.0 - beta**seen) if seen > 0 else torch.zeros_like(g)
                noise_l.append(g - ref)
            if self.momentum_key is None:
                ops.lerp_([st[key] for st in lstates], lgrads, 1.0 - _GRAD_EMA_BETA)
        inputs = self._matrix_inputs(group, lparams, lgrads, lstates, ops)
        dirs: list[Tensor | None] = [None] * n
        norms: list[Tensor | None] = [None] * n
        whole = [i for i in range(n) if shardings[i] is None]
        # regular tensors may share the work DDP-style; replicated DTensors are transformed locally
        for idx, mode in (
            ([i for i in whole if not is_dtensor(params[i])], "auto"),
            ([i for i in whole if is_dtensor(params[i])], "local"),
        ):
            if not idx:
                continue
            with self._ns_mode_as(mode):
                d, nr = self._compute_dirs(
                    group,
                    [params[i] for i in idx],
                    [lgrads[i] for i in idx],
                    [states[i] for i in idx],
                    [inputs[i].reshape(views[i]) for i in idx],
                    None if noise_l is None else [noise_l[i].reshape(views[i]) for i in idx],
                    foreach,
                )
            for i, di, ni in zip(idx, d, nr):
                dirs[i], norms[i] = di, ni
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for i in range(n):
            sh = shardings[i]
            if sh is not None:
                buckets.setdefault((id(sh.group), sh.world, sh.rank), []).append(i)
        for idx in buckets.values():
            self._owner_exchange(
                group, idx, params, lgrads, states, inputs, noise_l, views, shardings[idx[0]], foreach, dirs, norms
            )
        factors: list[Tensor | float] = [1.0] * n
        if noise:
            factors = self._noise_factors(group, states, norms, [math.prod(v) > 0 for v in views])  # type: ignore[arg-type]
        lr = group["lr"]
        wd = group["weight_decay"]
        if wd != 0.0:
            _mul_scalar_(ops, lparams, 1.0 - lr * wd)
        # one add per matrix: the shape factor goes into alpha, the direction is added in its own
        # dtype and layout (no scaled or cast copy)
        for i, (lp, d, view, f) in enumerate(zip(lparams, dirs, views, factors)):
            assert d is not None
            if isinstance(f, Tensor):
                sh = shardings[i]
                if sh is None or f.ndim == 0:
                    d = d * f.to(d.dtype).reshape(f.shape + (1, 1))
                else:  # a stack of matrices sharded on its first dim: this rank's factors
                    off, length = sh.rows(params[i].shape[0])[sh.rank]
                    fr = f.to(d.dtype).reshape(tuple(params[i].shape[:-2]))[off : off + length]
                    d = d * fr.reshape(fr.shape + (1, 1))
            m, k = view[-2:]
            lp.add_(d.reshape(lp.shape), alpha=-lr * lr_adjustment(m, k, group["adjust_lr"]))

    def _compute_dirs(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor | None],
        states: list[dict[str, Any]],
        mats: list[Tensor],
        noise_mats: list[Tensor] | None,
        foreach: bool,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Directions (matrix-shaped) of whole matrices ``mats`` and, with ``noise_mats``, the
        dual norms of the noise matrices."""
        norms: list[Tensor | None]
        if noise_mats is not None and self.lmo_dual_norm == "nuclear":
            outs, extra = self._transform(group, mats, foreach, extra=noise_mats)
            norms = [(o.to(d.dtype) * d).sum(dim=(-2, -1)) for o, d in zip(extra, noise_mats)]
        else:
            outs, _ = self._transform(group, mats, foreach)
            if noise_mats is not None:
                norms = [torch.linalg.vector_norm(d, dim=(-2, -1)) for d in noise_mats]
            else:
                norms = [None] * len(mats)
        return self._finish(group, params, grads, states, mats, outs), norms  # type: ignore[arg-type]

    def _wire_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        """dtype in which an owner sends a direction back: at least the direction's own dtype (the
        parameter's, at least float32, or the Newton-Schulz dtype), so the cast is exact."""
        dt = torch.promote_types(p.dtype, torch.float32)
        ns = group.get("ns_dtype")
        if ns is not None:
            dt = torch.promote_types(dt, _compute_dtype(torch.empty((), dtype=p.dtype), ns))
        return dt

    def _owner_exchange(
        self,
        group: dict[str, Any],
        idx: list[int],
        params: list[Tensor],
        lgrads: list[Tensor],
        states: list[dict[str, Any]],
        inputs: list[Tensor],
        noise_l: list[Tensor] | None,
        views: list[tuple[int, ...]],
        sh: RowSharding,
        foreach: bool,
        dirs: list[Tensor | None],
        norms: list[Tensor | None],
    ) -> None:
        """FSDP2: gather the matrices ``idx`` (sharded on dim 0 over ``sh``) to their owners,
        transform them there, and send every rank its rows of the results and the new per-matrix
        statistics (two ``all_to_all_single`` calls). Fills ``dirs`` (local rows, parameter-shaped)
        and ``norms`` (whole, every rank) at ``idx``."""
        world, me = sh.world, sh.rank
        count = len(idx)
        shapes = [tuple(params[i].shape) for i in idx]
        rows = [sh.rows(s[0]) for s in shapes]
        row_numel = [math.prod(s[1:]) for s in shapes]
        for k, i in enumerate(idx):
            if inputs[i].shape[0] != rows[k][me][1]:
                raise RuntimeError(
                    f"{type(self).__name__}: the local shard of a {shapes[k]} parameter has {inputs[i].shape[0]} rows "
                    f"on rank {me} of {world}; expected the torch.chunk layout of Shard(0) ({rows[k][me][1]} rows)"
                )
        settings = self._ns_settings(group) if "ns_steps" in group else None
        owners = assign_owners([matrix_cost(views[i], params[i].dtype, settings) for i in idx], world)
        mine = [k for k in range(count) if owners[k] == me]
        by_owner = [[k for k in range(count) if owners[k] == r] for r in range(world)]
        pieces = []
        for i in idx:
            ps = [inputs[i]]
            if noise_l is not None:
                ps.append(noise_l[i])
            if self.finish_needs_grad:
                ps.append(lgrads[i])
            pieces.append(ps)
        stats = self.last_ns_stats
        # 1. every rank sends its rows of each matrix to the matrix's owner
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for k in range(count):
            if owners[k] != me:
                send[owners[k]].extend(to_bytes(t) for t in pieces[k])
        recv = [
            sum(nbytes(rows[k][s][1] * row_numel[k], t.dtype) for k in mine for t in pieces[k]) for s in range(world)
        ]
        bufs, sent, got = exchange(sh, send, recv)
        offs = [0] * world
        full: dict[int, list[Tensor]] = {}
        for k in mine:
            whole_pieces = []
            for t in pieces[k]:
                parts = []
                for s in range(world):
                    if s == me:
                        parts.append(t)
                    else:
                        x, offs[s] = from_bytes(bufs[s], offs[s], t.dtype, (rows[k][s][1], *shapes[k][1:]), t.device)
                        parts.append(x)
                whole_pieces.append(torch.cat(parts))
            full[k] = whole_pieces
        # 2. the owner transforms its whole matrices (Newton-Schulz batched by shape)
        own_dirs: dict[int, Tensor] = {}
        own_norms: dict[int, Tensor | None] = {}
        before = stats["local_matrices"]
        if mine:
            gpos = 1 + (noise_l is not None)
            with self._ns_mode_as("owner"):
                d, nr = self._compute_dirs(
                    group,
                    [params[idx[k]] for k in mine],
                    [full[k][gpos] if self.finish_needs_grad else None for k in mine],
                    [states[idx[k]] for k in mine],
                    [full[k][0].reshape(views[idx[k]]) for k in mine],
                    None if noise_l is None else [full[k][1].reshape(views[idx[k]]) for k in mine],
                    foreach,
                )
            for k, dk, nk in zip(mine, d, nr):
                own_dirs[k] = dk.reshape(shapes[k]).to(self._wire_dtype(params[idx[k]], group))
                own_norms[k] = nk
        del full
        my_ns = stats["local_matrices"] - before

        def stat_keys(k: int) -> list[str]:
            return [key for key in self.matrix_stat_keys if isinstance(states[idx[k]].get(key), Tensor)]

        def norm_shape(k: int) -> tuple[int, ...]:
            v = views[idx[k]]
            return (v[0],) if len(v) == 3 else ()

        # 3. the owner sends every rank its rows, the noise norms and the new statistics
        header = [to_bytes(torch.tensor([my_ns], dtype=torch.int64))]
        for k in mine:
            if noise_l is not None:
                header.append(to_bytes(own_norms[k].to(torch.float64)))  # type: ignore[union-attr]
            header.extend(to_bytes(states[idx[k]][key]) for key in stat_keys(k))
        send = [[] for _ in range(world)]
        for r in range(world):
            if r == me:
                continue
            send[r] = list(header)
            for k in mine:
                off, length = rows[k][r]
                send[r].append(to_bytes(own_dirs[k][off : off + length]))
        recv = []
        for s in range(world):
            size = nbytes(1, torch.int64)
            for k in by_owner[s]:
                if noise_l is not None:
                    size += nbytes(math.prod(norm_shape(k)), torch.float64)
                size += sum(nbytes(states[idx[k]][key].numel(), states[idx[k]][key].dtype) for key in stat_keys(k))
            for k in by_owner[s]:
                size += nbytes(rows[k][me][1] * row_numel[k], self._wire_dtype(params[idx[k]], group))
            recv.append(size)
        bufs, sent2, got2 = exchange(sh, send, recv)
        total_ns = my_ns
        for s in range(world):
            if s == me:
                continue
            buf, off = bufs[s], 0
            c, off = from_bytes(buf, off, torch.int64, (1,), torch.device("cpu"))
            total_ns += int(c.item())
            for k in by_owner[s]:
                if noise_l is not None:
                    norms[idx[k]], off = from_bytes(buf, off, torch.float64, norm_shape(k), lgrads[idx[k]].device)
                for key in stat_keys(k):
                    st = states[idx[k]][key]
                    val, off = from_bytes(buf, off, st.dtype, tuple(st.shape), st.device)
                    st.copy_(val)
            for k in by_owner[s]:
                dt = self._wire_dtype(params[idx[k]], group)
                shape = (rows[k][me][1], *shapes[k][1:])
                dirs[idx[k]], off = from_bytes(buf, off, dt, shape, lgrads[idx[k]].device)
        for k in mine:
            off, length = rows[k][me]
            dirs[idx[k]] = own_dirs[k][off : off + length]
            norms[idx[k]] = own_norms[k]
        stats["matrices"] += total_ns
        stats["world_size"] = world
        stats["sent_bytes"] += sent + sent2
        stats["received_bytes"] += got + got2

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
        """Elementwise part before the matrix function; returns tensors shaped like the (local)
        params. It receives local shards under FSDP2, so it must be elementwise.
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
        """The matrix function applied to whole matrices ``mats`` (and, orthogonalized the same way,
        to ``extra``, the noise matrices whose nuclear norm is wanted). Default: Newton-Schulz."""
        return self._orthogonalize(group, mats, foreach, extra=extra)

    def _finish(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor | None],
        states: list[dict[str, Any]],
        mats: list[Tensor],
        outs: list[Tensor],
    ) -> list[Tensor]:
        """Directions (matrix-shaped) the parameters move along, before ``lr`` and the shape factor.
        Runs on whole matrices (on the owner rank under FSDP2): ``params`` serve for their (global)
        shape only, ``grads`` are whole gradients when :attr:`finish_needs_grad` (else None under
        FSDP2), and only the state tensors named in :attr:`matrix_stat_keys` may be updated."""
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

    @contextlib.contextmanager
    def _ns_mode_as(self, mode: str) -> Iterator[None]:
        """``"auto"``: Newton-Schulz shared DDP-style when :meth:`_distributed`; ``"local"``: on this
        rank; ``"owner"``: on this rank as the owner of FSDP2 matrices (counted as local work; the
        total is summed over the owners by the exchange)."""
        prev = getattr(self, "_ns_mode", "auto")
        self._ns_mode = mode
        try:
            yield
        finally:
            self._ns_mode = prev

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
        mode = getattr(self, "_ns_mode", "auto")
        if mode == "auto" and self._distributed(group):
            res, local_count = self._distributed_orthogonalize(work, settings, foreach)
            stats["world_size"] = dist.get_world_size()
        else:
            # contiguous results: later reductions then round the same way on every rank
            res = [r.contiguous() for r in orthogonalize(work, batched=foreach, **settings)]
            local_count = len(work)
        if mode != "owner":
            stats["matrices"] += len(work)
        stats["local_matrices"] += local_count
        return res[: len(mats)], res[len(mats) :]

    def _step_groups(self) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.last_ns_stats = self._fresh_stats(world)
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
        """DDP: each rank orthogonalizes the matrices it owns; the results are all-gathered."""
        world, rank = dist.get_world_size(), dist.get_rank()
        costs = [matrix_cost(tuple(x.shape), x.dtype, settings) for x in work]
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
                "replicated parameters (e.g. model parallelism with regular tensors)"
            )
        owner = assign_owners(costs, world)
        dtypes = [_compute_dtype(x, settings["dtype"]) for x in work]
        mine = [i for i in range(len(work)) if owner[i] == rank]
        local_res = orthogonalize([work[i] for i in mine], batched=foreach, **settings)
        results: list[Tensor | None] = [None] * len(work)
        for i, r in zip(mine, local_res):
            results[i] = r.contiguous()
        stats = self.last_ns_stats
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
            stats["sent_bytes"] += flat.numel() * flat.element_size() * (world - 1)
            stats["received_bytes"] += flat.numel() * flat.element_size() * (world - 1)
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
