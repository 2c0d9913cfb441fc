"""HF twin of :class:`lit_optim.callbacks.WeightAveragingCallback`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._common import _dist_ready
from .base import LitCallback


def _default_eval_loss(model: nn.Module, dataloader: Any) -> dict[str, float]:
    """Mean of ``model(**batch).loss`` over ``dataloader``, weighted by batch size and summed over
    data-parallel processes."""
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for batch in dataloader:
        out = model(**batch)
        loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is None:
            raise TypeError(
                "WeightAveragingCallback evaluates the averages with model(**batch).loss, but the model returned no "
                "loss (are there labels in the eval batches?); pass eval_fn=(model, dataloader) -> {'loss': ...}"
            )
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        n = first.shape[0] if first is not None else 1
        total += loss.detach().double().cpu() * n
        count += n
    if _dist_ready():
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
        buf = torch.stack([total, count]).to(dev)
        torch.distributed.all_reduce(buf)
        total, count = buf[0].cpu(), buf[1].cpu()
    return {"loss": float(total / count) if count > 0 else math.nan}


class WeightAveragingCallback(LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.WeightAveragingCallback`: running averages of the
    weights (EMA with one or several decays, or a uniform SWA average), evaluated at every
    evaluation and saved with every checkpoint; the maths is
    :class:`lit_optim.functional.averaging.MultiEMA` (torch's ``swa_utils`` update functions).

    * **Updates** after each optimizer step (``on_step_end``, so once per accumulated batch) from
      ``start_step`` on (zero-based), every ``every_n_steps`` steps (override
      :meth:`should_update` for another policy).
    * **What is averaged.** ``trainable_only=True`` (default) averages the parameters that
      require grad: for a PEFT model only the LoRA weights (a full copy of a frozen base model per
      average would be waste). ``False`` averages the whole model with its floating buffers.
    * **Evaluation** in ``on_evaluate``: each average is swapped into the model and evaluated on
      the Trainer's eval loader by ``eval_fn(model, dataloader) -> {name: value}`` (default: the
      mean of ``model(**batch).loss``, summed over DDP processes); the results join the eval
      metrics as ``eval_<name>_<label>`` (``eval_loss_ema_0.999``), so
      ``metric_for_best_model="loss_ema_0.999"`` selects checkpoints by the average. The model's
      own weights are back in place afterwards.
    * **Checkpoints** hold the raw training weights (resume continues training); the averages are
      in ``lit_optim_weight_averaging.pt`` next to them and come back on resume.
    * **End of training**: with ``write_at_end=True`` the primary average is written into the model
      (refused with a warning if it holds NaN/Inf), so ``trainer.save_model()`` saves it. Get an
      average without touching the model with :meth:`averaged_state_dict`.

    Args:
        kind: ``"ema"`` or ``"uniform"``.
        decays: EMA decays in [0, 1) (default ``(0.999,)``); not allowed with ``"uniform"``.
        start_step, every_n_steps: when to update (see above).
        evaluate: evaluate the averages at each evaluation (default True).
        primary: the average written at the end: index, decay or label (default None: the first
            average; None survives config round trips, where an index 0 may come back as 0.0).
        trainable_only: average only parameters that require grad (default True).
        device, dtype: where and in which floating dtype to keep the averages (default: as the
            weights; ``"cpu"`` saves accelerator memory, ``torch.float32`` for bf16 weights).
        write_at_end: write the primary average into the model when training ends (default True).
        eval_fn: ``eval_fn(model, dataloader) -> dict[str, float]`` used to evaluate an average.
    """

    name = "weight_averaging"

    def __init__(
        self,
        kind: str = "ema",
        decays: Any = None,
        *,
        start_step: int = 0,
        every_n_steps: int = 1,
        evaluate: bool = True,
        primary: int | float | str | None = None,
        trainable_only: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        write_at_end: bool = True,
        eval_fn: Any = None,
    ):
        from ....functional.averaging import MultiEMA

        super().__init__()
        for arg, value, lo in (("start_step", start_step, 0), ("every_n_steps", every_n_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an integer >= {lo}, got {type(value).__name__} {value!r}")
            if value < lo:
                raise ValueError(f"{arg} must be an integer >= {lo}, got {value!r}")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable(model, dataloader) -> dict, got {type(eval_fn).__name__}")
        # validate kind / decays / dtype / primary now, on a throw-away tensor
        probe = MultiEMA([torch.zeros(1)], decays, kind, dtype=dtype)
        probe.index(primary)
        self.kind, self.decays = kind, probe.decays
        self.start_step, self.every_n_steps = start_step, every_n_steps
        self.evaluate, self.primary = bool(evaluate), primary
        self.trainable_only, self.device, self.dtype = bool(trainable_only), device, dtype
        self.write_at_end = bool(write_at_end)
        self.eval_fn = eval_fn or _default_eval_loss
        self.labels = probe.labels
        self.ema: Any = None
        self._restored: dict[str, Any] | None = None

    def should_update(self, step_idx: int) -> bool:
        """Whether the averages take the weights after optimizer step ``step_idx`` (zero-based)."""
        return step_idx >= self.start_step and (step_idx - self.start_step) % self.every_n_steps == 0

    def _build(self, model: nn.Module) -> None:
        from ....functional.averaging import MultiEMA

        decays = self.decays if self.kind == "ema" else None
        if self.trainable_only:
            tensors = [p for p in model.parameters() if p.requires_grad]
            if not tensors:
                raise ValueError("WeightAveragingCallback(trainable_only=True): the model has no trainable parameters")
            self.ema = MultiEMA(tensors, decays, self.kind, device=self.device, dtype=self.dtype)
        else:
            self.ema = MultiEMA(model, decays, self.kind, device=self.device, dtype=self.dtype)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("WeightAveragingCallback needs the model (passed by the Trainer to callbacks)")
        self._build(model)
        self._restore_if_resuming(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.ema is not None and self.should_update(state.global_step - 1):
            self.ema.update()

    @torch.no_grad()
    def evaluate_averages(self, model: nn.Module, dataloader: Any) -> dict[str, float]:
        """``{"eval_<name>_<label>": value}`` for every average (the raw weights are restored)."""
        out: dict[str, float] = {}
        if self.ema is None or self.ema.n_averaged == 0 or dataloader is None:
            return out
        was_training = model.training
        model.eval()
        try:
            for k, label in enumerate(self.labels):
                with self.ema.swapped(k):
                    res = self.eval_fn(model, dataloader)
                for key, value in res.items():
                    out[f"eval_{key}_{label}"] = float(value)
        finally:
            model.train(was_training)
        return out

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if not self.evaluate or model is None:
            return
        res = self.evaluate_averages(model, eval_dataloader)
        if not res:
            return
        if metrics is not None:
            metrics.update(res)
        if state.log_history and any(k.startswith("eval_") for k in state.log_history[-1]):
            state.log_history[-1].update(res)
        self._pending_eval = res

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.write_at_end or self.ema is None or self.ema.n_averaged == 0:
            return
        try:
            self.ema.copy_to(self.primary)
        except ValueError as e:
            import warnings

            warnings.warn(f"WeightAveragingCallback: not writing the average into the model: {e}", stacklevel=2)

    def averaged_state_dict(self, which: float | str | None = None) -> dict[str, torch.Tensor]:
        """The averaged tensors (trainable-only: keyed by parameter position) or the model's state
        dict with the average in place (whole model)."""
        if self.ema is None:
            raise ValueError("no averages yet: training has not started")
        return self.ema.averaged_state_dict(self.primary if which is None else which)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.ema is None else {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state:
            if self.ema is None:
                raise ValueError("WeightAveragingCallback.load_state_dict: call it once training has started")
            self.ema.load_state_dict(state["ema"])
