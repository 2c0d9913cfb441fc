"""HF twin of :class:`lit_optim.callbacks.GradClipMedianCallback`."""

from __future__ import annotations

from typing import Any

from ....functional.log_keys import grad_clip_logs
from .._common import _refuse_sharded, unwrap_optimizer
from .base import LitCallback


class GradClipMedianCallback(LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.GradClipMedianCallback`: clip the gradients at
    ``factor`` times a running median of past gradient norms (Schaipp, Garrigos, Simsekli & Gower,
    *SGD with Clipping is Secretly Estimating the Median Gradient*, arXiv:2402.12828); the maths is
    :class:`lit_optim.functional.grad_stats.MedianClipper`.

    It acts in ``on_pre_optimizer_step``, after the last backward of the step (and DDP's
    all-reduce), before ``optimizer.step()``. HF clips by norm *before* that hook whenever
    ``TrainingArguments.max_grad_norm > 0`` (the default is 1.0), which would clip a second time at
    a constant threshold: :class:`~lit_optim.integrations.hf.LitTrainer` and
    :class:`~lit_optim.integrations.hf.CurvatureTrainer` switch HF's clipping off when this callback
    is present; under a plain ``Trainer`` the callback requires ``max_grad_norm=0`` and raises
    otherwise.
    With fp16 AMP it unscales the gradients first (through the optimizer's ``GradScaler``, which
    then does not unscale twice); bf16 needs nothing. FSDP and DeepSpeed are refused.

    Logged: ``grad_clip/grad_norm`` (before clipping), ``grad_clip/threshold`` (in coordinate modes
    the mean per-coordinate threshold), ``grad_clip/clipped_fraction`` and, in coordinate modes,
    ``grad_clip/clipped_coord_fraction`` (values of the last step before each log): the keys of the
    Lightning callback (:mod:`lit_optim.functional.log_keys`). Arguments: those of
    :class:`~lit_optim.functional.grad_stats.MedianClipper` (``mode``, ``window``, ``factor``,
    ``threshold``, ``estimator``, ``median_step``, ``min_history``) and ``log_stats``.
    """

    name = "grad_clip_median"

    def __init__(
        self,
        mode: str = "norm",
        window: int = 100,
        factor: float = 2.0,
        *,
        threshold: float | None = None,
        estimator: str = "window",
        median_step: float = 0.05,
        min_history: int = 10,
        log_stats: bool = True,
    ):
        from ....functional.grad_stats import MedianClipper

        super().__init__()
        self._kwargs = {
            "mode": mode,
            "window": window,
            "factor": factor,
            "threshold": threshold,
            "estimator": estimator,
            "median_step": median_step,
            "min_history": min_history,
        }
        self.clipper = MedianClipper(**self._kwargs)  # validates the arguments
        self.log_stats = bool(log_stats)
        self.last_info: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"GradClipMedianCallback replaces HF's gradient clipping, but TrainingArguments(max_grad_norm="
                f"{args.max_grad_norm}) is set: HF clips the gradient norm in its training loop before "
                "on_pre_optimizer_step, so the gradients would be clipped twice. Set max_grad_norm=0 (use "
                "mode='constant', threshold=... for constant clipping through this callback), or train with "
                "lit_optim.integrations.hf.LitTrainer, which switches HF's clipping off for this callback"
            )
        _refuse_sharded(args, "GradClipMedianCallback")
        self._restore_if_resuming(args, state)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        scaler = getattr(optimizer, "scaler", None)
        inner = unwrap_optimizer(optimizer)
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(inner)
        params = [p for g in inner.param_groups for p in g["params"]]
        info = self.clipper.clip_(params)
        self.last_info = info
        if self.log_stats:  # the same keys as the Lightning callback (lit_optim.functional.log_keys)
            self._pending = grad_clip_logs(info, self.clipper)

    def state_dict(self) -> dict[str, Any]:
        return {"clipper": self.clipper.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state["clipper"])
