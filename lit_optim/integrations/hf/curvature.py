"""Diagonal-Hessian estimates inside HF's ``training_step`` for Sophia and AdaHessian
(:class:`CurvatureTrainerMixin`; :class:`~lit_optim.integrations.hf.CurvatureTrainer` is the
ready-made ``Trainer``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..._validation import check_positive_int
from ._common import unwrap_optimizer

_ESTIMATORS = ("gnb", "hutchinson")


class CurvatureTrainerMixin:
    r"""Runs a diagonal-Hessian estimate every ``curvature_every_n_steps`` optimizer steps inside
    ``training_step`` and hands it to the optimizer (``optimizer.update_hessian(...)``), so that
    Sophia and AdaHessian train in HF's loop unchanged. Mix it in front of any ``Trainer`` subclass
    (``class MyTrainer(CurvatureTrainerMixin, SFTTrainer)``) or use :class:`CurvatureTrainer`.

    Estimators (see :mod:`lit_optim.curvature`):

    * ``"gnb"`` (Gauss-Newton-Bartlett, Sophia-G's): labels sampled from the model's own logits,
      one extra forward and one ordinary backward on the step's first micro-batch; works through
      fused attention kernels. Needs the model's logits: the default
      :meth:`curvature_logits` returns ``model(**inputs_without_labels).logits`` and masks padding
      with ``attention_mask``; override it for other models.
    * ``"hutchinson"`` (AdaHessian's, Sophia-H's): Hessian-vector products of the training loss
      (``compute_loss``) by double backward; needs every op to have a double-backward formula. The
      estimate's forward runs with PyTorch's math attention backend (``sdpa_kernel(MATH)``), so
      HF models using ``attn_implementation="sdpa"`` work; custom fused kernels (flash-attention
      packages) raise :class:`~lit_optim.functional.hutchinson.DoubleBackwardError` naming the fixes.

    The estimate is computed on the unwrapped model (no DDP hooks fire) and averaged over
    data-parallel processes. Probes and sampled labels come from a generator seeded by
    ``(curvature_seed, global_step, rank)``, so a run resumed from a checkpoint draws the same
    ones as a run that never stopped; the curvature EMA itself lives in the optimizer state and is
    saved with HF's checkpoints. FSDP and DeepSpeed (sharded parameters) are not supported.

    **Logged** under the keys of the Lightning :class:`~lit_optim.callbacks.HessianDiagCallback`
    (merged into the next ``Trainer.log`` call, so they reach ``report_to`` and
    ``state.log_history``; values of the last estimate before each log, also kept in
    :attr:`last_curvature_stats`): ``curvature/trace`` (sum of the estimated diagonal),
    ``curvature/diag_mean``, ``curvature/trace_lr_over_2`` (:math:`\operatorname{tr}(H)\,\eta/2`,
    :math:`\eta` the first group's learning rate), ``curvature/clip_fraction`` (Sophia's clipped
    share of the last update), and with ``curvature_log_top_eigenvalue=True``
    ``curvature/top_eigenvalue`` and ``curvature/top_eigenvalue_lr_over_2`` (power iteration on the
    training loss, double backward). ``curvature_log_stats=False`` turns the logging off.

    Args:
        curvature_estimator: ``"gnb"``, ``"hutchinson"`` or None (the optimizer's
            ``hessian_estimator``: GNB for Sophia, Hutchinson for AdaHessian).
        curvature_every_n_steps: k, optimizer steps between estimates (Sophia's paper: 10).
        curvature_samples: label draws (GNB) or probes (Hutchinson) averaged per estimate.
        curvature_seed: seed of the probes / sampled labels.
        curvature_log_stats: log the statistics above (default True).
        curvature_log_top_eigenvalue: also estimate the top Hessian eigenvalue at each estimate
            (``curvature_eigen_iters`` Hessian-vector products; default False).
        curvature_eigen_iters: maximum power iterations (default 20).
    """

    def __init__(
        self,
        *args: Any,
        curvature_estimator: str | None = None,
        curvature_every_n_steps: int = 10,
        curvature_samples: int = 1,
        curvature_seed: int = 0,
        curvature_log_stats: bool = True,
        curvature_log_top_eigenvalue: bool = False,
        curvature_eigen_iters: int = 20,
        **kwargs: Any,
    ):
        if curvature_estimator is not None and curvature_estimator not in _ESTIMATORS:
            raise ValueError(f"curvature_estimator must be one of {[*_ESTIMATORS, None]}, got {curvature_estimator!r}")
        for arg, value in (
            ("curvature_every_n_steps", curvature_every_n_steps),
            ("curvature_samples", curvature_samples),
            ("curvature_eigen_iters", curvature_eigen_iters),
        ):
            check_positive_int(arg, value)
        if isinstance(curvature_seed, bool) or not isinstance(curvature_seed, int):
            raise TypeError(
                f"curvature_seed must be an integer, got {type(curvature_seed).__name__} {curvature_seed!r}"
            )
        self.curvature_estimator = curvature_estimator
        self.curvature_every_n_steps = curvature_every_n_steps
        self.curvature_samples = curvature_samples
        self.curvature_seed = curvature_seed
        self.curvature_log_stats = bool(curvature_log_stats)
        self.curvature_log_top_eigenvalue = bool(curvature_log_top_eigenvalue)
        self.curvature_eigen_iters = curvature_eigen_iters
        #: the statistics of the last estimate (python floats), under HessianDiagCallback's keys
        self.last_curvature_stats: dict[str, float] = {}
        self._curvature_pending: dict[str, float] = {}
        self._curvature_eigvec: Any = None
        #: number of estimates handed to the optimizer in this process (for logging and tests)
        self.num_curvature_estimates = 0
        self._curvature_last_step = -1
        super().__init__(*args, **kwargs)

    # -- hooks a user may override --------------------------------------------------------------

    def curvature_logits(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, mask)`` for the GNB estimate: ``logits`` of shape ``(..., classes)`` with
        their graph, ``mask`` (shape ``logits.shape[:-1]``, True where an output counts) or None.
        ``inputs`` are the micro-batch without ``labels``."""
        out = model(**inputs)
        logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        if logits is None:
            raise TypeError(
                f"CurvatureTrainer: {type(model).__name__}'s output has no 'logits' for the GNB estimate; override "
                "curvature_logits(model, inputs) to return (logits, mask), or use curvature_estimator='hutchinson'"
            )
        mask = inputs.get("attention_mask")
        if mask is not None and tuple(mask.shape) == tuple(logits.shape[:-1]):
            mask = mask.to(torch.bool)
        else:
            mask = None
        return logits, mask

    # -- machinery ------------------------------------------------------------------------------

    def _hessian_consumer(self) -> Any:
        opt = unwrap_optimizer(self.optimizer)
        if not callable(getattr(opt, "update_hessian", None)):
            raise TypeError(
                f"CurvatureTrainer needs an optimizer that consumes Hessian estimates (update_hessian), such as "
                f"'sophia' or 'adahessian'; got {type(opt).__name__}. Use transformers.Trainer for other optimizers."
            )
        return opt

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        step = self.state.global_step  # type: ignore[attr-defined]
        if step % self.curvature_every_n_steps == 0 and step != self._curvature_last_step:
            self._curvature_last_step = step
            self.estimate_curvature(inputs)
        return loss

    def estimate_curvature(self, inputs: dict[str, Any]) -> None:
        """Estimate the diagonal Hessian on ``inputs`` and feed it to the optimizer."""
        from ...curvature import all_reduce_mean, gnb_diagonal, hutchinson_diagonal
        from ...functional.hutchinson import make_generator, probe_seed

        opt = self._hessian_consumer()
        estimator = self.curvature_estimator or getattr(opt, "hessian_estimator", "gnb")
        params = opt.hessian_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        tparams = [params[i] for i in trainable]
        if not tparams:
            return
        model = self.model  # type: ignore[attr-defined]  # unwrapped: DDP's reducer is not involved
        inputs = self._prepare_inputs(dict(inputs))  # type: ignore[attr-defined]
        rank = self.args.process_index  # type: ignore[attr-defined]
        step = self.state.global_step  # type: ignore[attr-defined]
        gen = make_generator(probe_seed(self.curvature_seed, step, rank), tparams[0].device)
        with torch.enable_grad():
            if estimator == "gnb":
                fwd = {k: v for k, v in inputs.items() if k != "labels"}
                with self.compute_loss_context_manager():  # type: ignore[attr-defined]
                    logits, mask = self.curvature_logits(model, fwd)
                diag = gnb_diagonal(logits, tparams, n_samples=self.curvature_samples, generator=gen, mask=mask)
            else:
                # the math SDPA backend has a double-backward formula; the fused kernels do not
                with sdpa_kernel([SDPBackend.MATH]), self.compute_loss_context_manager():  # type: ignore[attr-defined]
                    loss = self.compute_loss(model, dict(inputs))  # type: ignore[attr-defined]
                    diag = hutchinson_diagonal(loss, tparams, n_probes=self.curvature_samples, generator=gen)
        diag = all_reduce_mean(diag)
        full: list[torch.Tensor | None] = [None] * len(params)
        for i, d in zip(trainable, diag):
            full[i] = d
        opt.update_hessian(full)
        self.num_curvature_estimates += 1
        if self.curvature_log_stats:
            self._record_curvature_stats(opt, model, inputs, tparams, diag, step, rank)

    def _record_curvature_stats(
        self, opt: Any, model: nn.Module, inputs: dict[str, Any], params: list, diag: list, step: int, rank: int
    ) -> None:
        """The statistics HessianDiagCallback logs, for the next ``log`` call."""
        present = [d for d in diag if d is not None]
        if not present:
            return
        trace = float(torch.stack([d.detach().float().sum().cpu() for d in present]).sum())
        numel = sum(d.numel() for d in present)
        lr = float(opt.param_groups[0]["lr"])
        stats = {
            "curvature/trace": trace,
            "curvature/diag_mean": trace / max(numel, 1),
            "curvature/trace_lr_over_2": trace * lr / 2.0,
        }
        if self.curvature_log_top_eigenvalue:
            from ...curvature import all_reduce_mean, top_hessian_eigenvalue
            from ...functional.hutchinson import make_generator, probe_seed

            gen = make_generator(probe_seed(self.curvature_seed + 1, step, rank), params[0].device)
            with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), self.compute_loss_context_manager():  # type: ignore[attr-defined]
                loss = self.compute_loss(model, dict(inputs))  # type: ignore[attr-defined]
                res = top_hessian_eigenvalue(
                    loss, params, self.curvature_eigen_iters, generator=gen, init=self._curvature_eigvec
                )
            self._curvature_eigvec = res.vector
            value = torch.tensor([res.eigenvalue], dtype=torch.float32, device=params[0].device)
            eig = float(all_reduce_mean([value])[0])
            stats["curvature/top_eigenvalue"] = eig
            stats["curvature/top_eigenvalue_lr_over_2"] = eig * lr / 2.0
        self.last_curvature_stats = stats
        self._curvature_pending = dict(stats)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.curvature_log_stats and self.optimizer is not None:  # type: ignore[attr-defined]
            extra, self._curvature_pending = self._curvature_pending, {}
            clip = getattr(unwrap_optimizer(self.optimizer), "clip_fraction", None)  # type: ignore[attr-defined]
            # with the estimate's values (as the Lightning callback logs it after an estimate step)
            frac = clip() if extra and callable(clip) else math.nan
            if not math.isnan(frac):  # NaN before the first step
                extra["curvature/clip_fraction"] = float(frac)
                self.last_curvature_stats["curvature/clip_fraction"] = float(frac)
            logs.update(extra)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]
