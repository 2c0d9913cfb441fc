"""Diagonal-Hessian estimates under Lightning's automatic optimization, for Sophia / AdaHessian and
for monitoring curvature (trace, top eigenvalue, the stability bound trace(H) <= 2/lr)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..curvature.consumer import is_hessian_consumer
from ..curvature.distributed import all_reduce_mean
from ..curvature.eigen import top_hessian_eigenvalue
from ..curvature.gnb import gnb_diagonal
from ..curvature.hutchinson import hutchinson_diagonal
from ..curvature.sharded import ShardedDoubleBackwardError, any_sharded, stashed_grads, sum_over_shards
from ..functional.hutchinson import PROBE_DISTRIBUTIONS, DoubleBackwardError, make_generator, probe_seed

__all__ = ["ESTIMATORS", "HessianDiagCallback"]

ESTIMATORS = ("gnb", "hutchinson")


def _slice_batch(batch: Any, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:n] if batch.dim() >= 1 else batch
    if isinstance(batch, Mapping):
        sliced = {k: _slice_batch(v, n) for k, v in batch.items()}
        try:
            return type(batch)(sliced)
        except TypeError:
            return sliced
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*[_slice_batch(v, n) for v in batch])
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(v, n) for v in batch)
    return batch


def _extract_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"HessianDiagCallback: cannot find logits in the model output of type {type(out).__name__}; pass "
        "logits_fn=lambda module, batch: ... or define curvature_logits(batch) on the LightningModule"
    )


def default_logits(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The logits the callback uses by default (see :class:`HessianDiagCallback`)."""
    fn = getattr(pl_module, "curvature_logits", None)
    if callable(fn):
        return _extract_logits(fn(batch))
    if isinstance(batch, Mapping):
        return _extract_logits(pl_module(**{k: v for k, v in batch.items() if k != "labels"}))
    if isinstance(batch, (list, tuple)):
        return _extract_logits(pl_module(batch[0]))
    return _extract_logits(pl_module(batch))


def default_loss(pl_module: pl.LightningModule, batch: Any, logits_fn: Callable | None = None) -> Tensor:
    """The loss the callback differentiates twice by default (see :class:`HessianDiagCallback`)."""
    fn = getattr(pl_module, "curvature_loss", None)
    if callable(fn):
        return fn(batch)
    if logits_fn is None and isinstance(batch, Mapping) and "labels" in batch:
        out = pl_module(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if isinstance(loss, Tensor):
            return loss
        logits, targets = _extract_logits(out), batch["labels"]
    else:
        logits = (logits_fn or default_logits)(pl_module, batch)
        if isinstance(batch, Mapping):
            targets = batch.get("labels")
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            targets = batch[1]
        else:
            targets = None
    if targets is None:
        raise TypeError(
            "HessianDiagCallback: the batch carries no targets ((inputs, targets) or a dict with 'labels'); pass "
            "loss_fn=lambda module, batch: ... or define curvature_loss(batch) on the LightningModule"
        )
    user_loss = getattr(pl_module, "loss_fn", None)
    if callable(user_loss):
        return user_loss(logits, targets)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class HessianDiagCallback(Callback):
    r"""Estimate the Hessian diagonal during training with automatic optimization, hand it to
    every optimizer that consumes one (:class:`~lit_optim.Sophia`, :class:`~lit_optim.AdaHessian`,
    anything with ``update_hessian``) and log curvature statistics.

    Usage::

        class LitModel(L.LightningModule):
            def configure_optimizers(self):
                return lit_optim.Sophia(self.parameters(), lr=2e-4)   # or lit_optim.configure_optimizers(self, "sophia")

        trainer = L.Trainer(callbacks=[HessianDiagCallback(estimator="gnb", every_n_steps=10)])

    No manual backward and no ``create_graph`` in user code: the callback stores the current batch
    in ``on_train_batch_start`` and, on every ``every_n_steps``-th optimizer step, in
    ``on_before_optimizer_step`` (after the backward, after AMP has unscaled the gradients, before
    clipping and the update) re-runs the model's forward on it and takes the estimate with
    :func:`torch.autograd.grad`, so the accumulated ``.grad`` is left untouched.

    **How the callback gets logits and the loss** (first match wins):

    * *GNB* needs logits: ``logits_fn(pl_module, batch)`` if given; else
      ``pl_module.curvature_logits(batch)`` if the module defines it; else ``pl_module(x)`` for a
      batch ``(x, y, ...)``, or ``pl_module(**batch)`` without ``"labels"`` for a dict batch. An
      output with a ``.logits`` attribute / ``"logits"`` key (Hugging Face) is unpacked. Every
      position of ``(..., C)`` logits is one output (tokens of a language model); for a dict batch
      with an ``attention_mask`` of the logits' leading shape, padding is left out.
    * *Hutchinson* and the eigenvalue need a loss: ``loss_fn(pl_module, batch)`` if given; else
      ``pl_module.curvature_loss(batch)``; else, for a dict batch with ``"labels"``, the ``loss`` of
      ``pl_module(**batch)`` (Hugging Face); else ``pl_module.loss_fn(logits, y)`` if the module
      defines ``loss_fn``, otherwise cross-entropy of the logits against ``y`` (``ignore_index=-100``).

    The estimate runs in Trainer's precision context (autocast), under its own random-number state
    seeded from ``(seed, global_step, rank)`` (dropout masks, probes and sampled labels are
    reproducible, a resumed run computes exactly what an uninterrupted one does, and the training
    RNG is not consumed). With float16 AMP the estimator's loss is multiplied by the GradScaler's
    scale and the estimate divided by it; an estimate that is not finite is skipped with a warning
    (``skipped_estimates``). Under DDP each process estimates on its own batch and the estimates
    are averaged (one ``all_reduce``), so all processes apply the same curvature. Under FSDP2
    (``ModelParallelStrategy`` with ``fully_shard``) only ``estimator="gnb"`` runs: the estimate
    is taken on the shards from the gradient of the *global* batch (one ``backward()`` per sample,
    the training gradients put aside meanwhile; see :mod:`lit_optim.curvature.sharded`), which is
    what one process would compute on that batch. Hutchinson and ``log_top_eigenvalue`` need a
    double backward, which cannot run through ``fully_shard``: they raise
    :class:`~lit_optim.curvature.sharded.ShardedDoubleBackwardError` when training starts. With gradient
    accumulation the estimate is taken once per optimizer step, on the last micro-batch.

    **Logged** (``self.log`` on estimate steps, also kept in :attr:`last_stats`):
    ``curvature/trace`` (sum of the estimated diagonal: :math:`\operatorname{tr} H` for Hutchinson,
    the Gauss-Newton trace for GNB), ``curvature/diag_mean``, ``curvature/trace_lr_over_2``
    (:math:`\operatorname{tr}(H)\,\eta/2`; a minimum is linearly stable for SGD only if it is
    :math:`\le 1`, Wu, Wang & Su, ICML 2023), ``curvature/clip_fraction`` (Sophia's clipped share
    after the step), and with ``log_top_eigenvalue=True`` ``curvature/top_eigenvalue`` and
    ``curvature/top_eigenvalue_lr_over_2`` (:math:`\lambda_{\max}\eta/2`; gradient descent is stable
    while :math:`\le 1`).

    Fused scaled-dot-product attention has no double backward: with ``estimator="hutchinson"`` (or
    the eigenvalue) through such a kernel the callback raises
    :class:`~lit_optim.curvature.DoubleBackwardError` naming the fixes (``estimator="gnb"``, the math
    attention backend, or ``math_attention=True`` here). It never returns zeros instead.

    Args:
        estimator: ``"gnb"`` (Gauss-Newton-Bartlett, one ordinary backward, Sophia-G), ``"hutchinson"``
            (double backward, AdaHessian / Sophia-H), or None (default): the consuming optimizers'
            ``hessian_estimator`` (Sophia: gnb, AdaHessian: hutchinson), ``"hutchinson"`` when only
            monitoring.
        every_n_steps: estimate on optimizer steps ``0, k, 2k, ...`` (Sophia's :math:`k`, default 10).
        n_probes: Hutchinson probes / GNB label samples averaged per estimate (default 1).
        probe: Hutchinson probe distribution, ``"rademacher"`` (default) or ``"gaussian"``.
        logits_fn: ``(pl_module, batch) -> logits`` (see above).
        loss_fn: ``(pl_module, batch) -> scalar loss`` (see above).
        max_samples: estimate on at most this many examples of the batch (dim 0), to cut the cost.
        log_stats: log the statistics above (default True).
        log_top_eigenvalue: also run power iteration for the top Hessian eigenvalue (costs
            ``eigen_iters`` Hessian-vector products per estimate; needs double backward).
        eigen_iters: maximum power iterations (default 20).
        math_attention: run the estimate's forward under
            ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` so that double backward works through
            ``F.scaled_dot_product_attention`` (default False).
        seed: seed of probes / sampled labels / dropout during estimates (default 0).
    """

    def __init__(
        self,
        estimator: str | None = None,
        every_n_steps: int = 10,
        n_probes: int = 1,
        probe: str = "rademacher",
        logits_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        max_samples: int | None = None,
        log_stats: bool = True,
        log_top_eigenvalue: bool = False,
        eigen_iters: int = 20,
        math_attention: bool = False,
        seed: int = 0,
    ):
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(ESTIMATORS)} or None, got {estimator!r}")
        for name, value in (("every_n_steps", every_n_steps), ("n_probes", n_probes), ("eigen_iters", eigen_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if probe not in PROBE_DISTRIBUTIONS:
            raise ValueError(f"probe must be one of {list(PROBE_DISTRIBUTIONS)}, got {probe!r}")
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
        for name, fn in (("logits_fn", logits_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (pl_module, batch) -> tensor, got {type(fn).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
        self.estimator = estimator
        self.every_n_steps = every_n_steps
        self.n_probes = n_probes
        self.probe = probe
        self.logits_fn = logits_fn
        self.loss_fn = loss_fn
        self.max_samples = max_samples
        self.log_stats = bool(log_stats)
        self.log_top_eigenvalue = bool(log_top_eigenvalue)
        self.eigen_iters = eigen_iters
        self.math_attention = bool(math_attention)
        self.seed = seed
        #: estimates handed to the optimizers so far
        self.num_estimates = 0
        #: estimates dropped because they were not finite (e.g. float16 overflow)
        self.skipped_estimates = 0
        #: the statistics of the last estimate (python floats)
        self.last_stats: dict[str, float] = {}
        self._batch: Any = None
        self._done_step: int | None = None
        self._log_clip_after_step = False
        self._eigvec: list[Tensor | None] | None = None
        self._sharded = False

    # -- policy ---------------------------------------------------------------------------------

    def should_estimate(self, trainer: pl.Trainer) -> bool:
        """Estimate on this optimizer step? Default: ``global_step % every_n_steps == 0``.
        Override for other schedules; the decision must be the same on every process."""
        return trainer.global_step % self.every_n_steps == 0

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _consumers(trainer: pl.Trainer) -> list[Any]:
        return [opt for opt in trainer.optimizers if is_hessian_consumer(opt)]

    def resolved_estimator(self, trainer: pl.Trainer) -> str:
        """The estimator in use: ``estimator`` or, when None, the consumers' preference."""
        if self.estimator is not None:
            return self.estimator
        prefs = {getattr(opt, "hessian_estimator", "hutchinson") for opt in self._consumers(trainer)}
        if len(prefs) > 1:
            raise ValueError(
                f"HessianDiagCallback: the optimizers prefer different estimators {sorted(prefs)}; pass estimator="
            )
        # FSDP2 (sharded parameters): only GNB can run, so monitoring alone uses it
        return prefs.pop() if prefs else ("gnb" if self._sharded else "hutchinson")

    def _params(self, trainer: pl.Trainer) -> list[Tensor]:
        opts = self._consumers(trainer) or list(trainer.optimizers)
        seen: set[int] = set()
        params = []
        for opt in opts:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad and p.grad is not None and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        return params

    @staticmethod
    def _loss_scale(trainer: pl.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    @contextlib.contextmanager
    def _rng(self, seed: int, device: torch.device):
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield

    def _context(self, trainer: pl.Trainer, seed: int, device: torch.device) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad())
        stack.enter_context(self._rng(seed, device))
        stack.enter_context(trainer.precision_plugin.train_step_context())
        if self.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def _logits_and_mask(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor | None]:
        logits = (self.logits_fn or default_logits)(pl_module, batch)
        mask = None
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
            am = batch["attention_mask"]
            if tuple(am.shape) == tuple(logits.shape[:-1]):
                mask = am.bool()
        return logits, mask

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        return default_loss(pl_module, batch, self.logits_fn)

    @staticmethod
    def _reraise(err: DoubleBackwardError, what: str) -> DoubleBackwardError:
        return DoubleBackwardError(
            f"HessianDiagCallback({what}): {err} With this callback you can also pass math_attention=True."
        )

    # -- the estimate ---------------------------------------------------------------------------

    def estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, params: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """This process's estimate on ``batch`` (before averaging across processes), aligned with
        ``params``. Override to plug in another estimator."""
        estimator = self.resolved_estimator(trainer)
        seed = probe_seed(self.seed, trainer.global_step, trainer.global_rank)
        device = params[0].device
        scale = self._loss_scale(trainer)
        # float16 AMP: the GradScaler's scale keeps small gradients from underflowing, but the
        # estimator's own backward may overflow at it; retry with smaller scales (same probes)
        scales = [scale] if scale == 1.0 else [scale, max(scale / 256.0, 1.0), 1.0]
        diag: list[Tensor | None] = []
        for s in dict.fromkeys(scales):
            gen = make_generator(seed, device)
            with self._context(trainer, seed, device), self._stash(pl_module, params):
                if estimator == "gnb":
                    logits, mask = self._logits_and_mask(pl_module, batch)
                    diag = gnb_diagonal(logits, params, self.n_probes, gen, mask=mask, loss_scale=s)
                else:
                    loss = self._loss(pl_module, batch)
                    try:
                        diag = hutchinson_diagonal(loss, params, self.n_probes, self.probe, gen, loss_scale=s)
                    except DoubleBackwardError as e:
                        raise self._reraise(e, "estimator='hutchinson'") from e
            if s == 1.0 or all(d is None or bool(torch.isfinite(d).all()) for d in diag):
                break
        return diag

    @staticmethod
    def _stash(pl_module: pl.LightningModule, params: Sequence[Tensor]) -> contextlib.AbstractContextManager:
        """Under FSDP2 the estimate runs ``backward()`` (see :mod:`lit_optim.curvature.sharded`):
        the training gradients of every parameter are put aside meanwhile and restored after."""
        if not any_sharded(params):
            return contextlib.nullcontext()
        return stashed_grads(list(pl_module.parameters()))

    def _top_eigenvalue(self, trainer, pl_module, batch, params) -> float:
        seed = probe_seed(self.seed + 1, trainer.global_step, trainer.global_rank)
        device = params[0].device
        with self._context(trainer, seed, device):
            loss = self._loss(pl_module, batch)
            try:
                res = top_hessian_eigenvalue(
                    loss,
                    params,
                    self.eigen_iters,
                    generator=make_generator(seed, device),
                    loss_scale=self._loss_scale(trainer),
                    init=self._eigvec,
                )
            except DoubleBackwardError as e:
                raise self._reraise(e, "log_top_eigenvalue=True") from e
        self._eigvec = res.vector
        value = torch.tensor([res.eigenvalue], dtype=torch.float32, device=device)
        return float(all_reduce_mean([value])[0])

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
            raise TypeError(
                f"HessianDiagCallback supports single-device, DDP (ddp, ddp_spawn, ddp_fork) and FSDP2 "
                f"(ModelParallelStrategy with fully_shard; estimator='gnb') strategies; got "
                f"{type(trainer.strategy).__name__}. FSDP1 (FSDPStrategy) and DeepSpeed hold flattened shards, not "
                "parameters to differentiate."
            )
        if not pl_module.automatic_optimization:
            rank_zero_warn(
                "HessianDiagCallback acts in on_before_optimizer_step, which Lightning calls from optimizer.step() "
                "in manual optimization too; make sure the stored batch is the one your training_step used."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sharded = any_sharded(pl_module.parameters())
        if self._sharded:
            what = None
            if self.log_top_eigenvalue:
                what = "HessianDiagCallback(log_top_eigenvalue=True)"
            elif self.resolved_estimator(trainer) == "hutchinson":
                what = "HessianDiagCallback(estimator='hutchinson')"
                if self.estimator is None:
                    what += " (the default of " + ", ".join(type(o).__name__ for o in self._consumers(trainer)) + ")"
            if what is not None:
                raise ShardedDoubleBackwardError(
                    f"{what} needs Hessian-vector products (a double backward through the gradient), which cannot run "
                    "through FSDP2's fully_shard: the parameters are sharded DTensors that torch.autograd.grad does "
                    "not reach, and FSDP2's reduce-scattered gradients carry no graph. Pass estimator='gnb' (the "
                    "Gauss-Newton-Bartlett estimate: one ordinary backward, computed on the shards from the "
                    "global-batch gradient; it also feeds AdaHessian) and log_top_eigenvalue=False, or train without "
                    "sharding (single device or DDP) to use Hutchinson."
                )
        consumers = self._consumers(trainer)
        for opt in consumers:
            mark = getattr(opt, "expect_external_hessian", None)
            if callable(mark):
                mark()
        if not consumers and not self.log_stats:
            rank_zero_warn(
                "HessianDiagCallback: no optimizer consumes Hessian estimates and log_stats=False: it does nothing"
            )
        self.resolved_estimator(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if self._done_step == step or not self.should_estimate(trainer):
            return
        self._done_step = step
        if self._batch is None:
            raise RuntimeError(
                "HessianDiagCallback: no batch was seen in on_train_batch_start before this optimizer step"
            )
        batch = self._batch if self.max_samples is None else _slice_batch(self._batch, self.max_samples)
        params = self._params(trainer)
        if not params:
            return
        local = self.estimate(trainer, pl_module, batch, params)
        if len(local) != len(params):
            raise ValueError(f"HessianDiagCallback.estimate returned {len(local)} tensors for {len(params)} parameters")
        distributed = trainer.world_size > 1
        if distributed:
            local = [torch.zeros_like(p) if d is None else d for p, d in zip(params, local)]
        # FSDP2: the sharded GNB estimate is already that of the global batch, agreed on every rank
        diag = local if self._sharded else all_reduce_mean(local)
        present = [d for d in diag if d is not None]
        if not present:
            return
        if self._sharded:
            total = sum_over_shards(present)
        else:
            total = torch.stack([d.detach().float().sum().to(present[0].device) for d in present]).sum()
        if not bool(torch.isfinite(total)):
            self.skipped_estimates += 1
            rank_zero_warn(
                f"HessianDiagCallback: the estimate at step {step} is not finite (NaN/Inf, e.g. float16 overflow); "
                "it was skipped and the optimizers keep their previous curvature"
            )
            return
        for opt in self._consumers(trainer):
            own = {id(p) for g in opt.param_groups for p in g["params"]}
            opt.update_hessian({p: d for p, d in zip(params, diag) if d is not None and id(p) in own})
        self.num_estimates += 1
        if not self.log_stats:
            return
        numel = sum(d.numel() for d in present)
        trace = float(total)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        stats = {
            "curvature/trace": trace,
            "curvature/diag_mean": trace / max(numel, 1),
            "curvature/trace_lr_over_2": trace * lr / 2.0,
        }
        if self.log_top_eigenvalue:
            eig = self._top_eigenvalue(trainer, pl_module, batch, params)
            stats["curvature/top_eigenvalue"] = eig
            stats["curvature/top_eigenvalue_lr_over_2"] = eig * lr / 2.0
        self.last_stats = stats
        self._log(pl_module, stats)
        self._log_clip_after_step = any(callable(getattr(o, "clip_fraction", None)) for o in trainer.optimizers)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None
        if not self._log_clip_after_step:
            return
        self._log_clip_after_step = False
        fractions = [o.clip_fraction() for o in trainer.optimizers if callable(getattr(o, "clip_fraction", None))]
        fractions = [f for f in fractions if not math.isnan(f)]
        if fractions:
            frac = sum(fractions) / len(fractions)
            self.last_stats["curvature/clip_fraction"] = frac
            self._log(pl_module, {"curvature/clip_fraction": frac})

    @staticmethod
    def _log(pl_module: pl.LightningModule, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_estimates": self.num_estimates,
            "skipped_estimates": self.skipped_estimates,
            "last_stats": dict(self.last_stats),
            "seed": self.seed,
            "every_n_steps": self.every_n_steps,
            "estimator": self.estimator,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_estimates = int(state_dict.get("num_estimates", 0))
        self.skipped_estimates = int(state_dict.get("skipped_estimates", 0))
        self.last_stats = dict(state_dict.get("last_stats", {}))
        for key in ("seed", "every_n_steps", "estimator"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                rank_zero_warn(
                    f"HessianDiagCallback: the checkpoint was written with {key}={state_dict[key]!r}, this callback has "
                    f"{key}={getattr(self, key)!r}; continuing with the new value (the run will differ from an "
                    "uninterrupted one)"
                )
