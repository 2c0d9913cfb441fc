"""Hugging Face ``Trainer`` integration: every lit_optim optimizer, callback and curvature estimator
in HF training.

Optimizers, two routes:

* ``Trainer(optimizers=create_optimizer_and_scheduler(model, "adan", args))``: the optimizer and
  HF's scheduler (``args.lr_scheduler_type``, warm-up from ``args``) built now.
* ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("muon", args))``: the Trainer builds
  the optimizer itself when it is ready, through the optimizer-factory form of
  ``optimizer_cls_and_kwargs`` (a callable that is not an ``Optimizer`` subclass, called as
  ``factory()(model, **kwargs)``). This is the route when the Trainer refuses ``optimizers=``
  (FSDP), and it also keeps HF's scheduler handling.

Both build the parameter groups the same way (:func:`optimizer_param_groups`): the optimizer's
registry grouping (matrices vs embeddings/head/1-D for the orthogonalized optimizers), the LoRA
groups of :mod:`lit_optim.integrations.peft` when the model is a PEFT model, then HF's weight-decay
rule (``Trainer.get_decay_parameter_names``: no decay on biases and LayerNorm/RMSNorm weights) with
``args.weight_decay``.

Hessian-based optimizers (Sophia, AdaHessian): :class:`CurvatureTrainer` /
:class:`CurvatureTrainerMixin` run the estimate every k steps inside ``training_step``.

``TrainerCallback`` twins of the lit_optim Lightning callbacks, each a thin shell over the same
Trainer-free code: :class:`WeightAveragingCallback`, :class:`GradClipMedianCallback`,
:class:`AdaptiveBatchSizeCallback`, :class:`StabilityGapCallback` (checkpoints and logging: see
:class:`LitCallback`; :class:`LitTrainer` forwards their logs to ``report_to`` integrations).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..functional.continual_metrics import StabilityGapReport
from ..registry import OptimizerInfo, get_optimizer_info
from . import peft as _peft

try:
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lit_optim.integrations.hf needs transformers (and accelerate); install the extra: pip install 'lit-optim[hf]'"
    ) from exc

__all__ = [
    "AdaptiveBatchSizeCallback",
    "CurvatureTrainer",
    "CurvatureTrainerMixin",
    "GradClipMedianCallback",
    "LitCallback",
    "LitOptimizerFactory",
    "LitTrainer",
    "LitTrainerMixin",
    "WeightAveragingCallback",
    "create_optimizer",
    "create_optimizer_and_scheduler",
    "estimate_training_steps",
    "hf_decay_parameter_names",
    "optimizer_cls_and_kwargs",
    "optimizer_param_groups",
    "unwrap_optimizer",
]


# ----------------------------------------------------------------------------- parameter groups


def hf_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters HF's ``Trainer`` applies weight decay to (its
    ``get_decay_parameter_names``: everything except biases and LayerNorm/RMSNorm weights)."""
    # get_decay_parameter_names does not use the Trainer instance; call it without building one
    try:
        return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    except (AttributeError, TypeError):  # a future version that needs the instance: HF's documented rule
        import re

        pattern = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
        norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
        return {n for n, p in model.named_parameters() if id(p) not in norms and not pattern.search(n.lower())}


def _is_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _check_lr_like(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be in [0, inf), got {value!r}")
    return float(value)


def optimizer_param_groups(
    model: nn.Module,
    name: str | OptimizerInfo,
    weight_decay: float = 0.0,
    *,
    lr: float | None = None,
    lora_plus_ratio: float | None = None,
    embedding_lr: float | None = None,
    orthogonalize_lora: bool = True,
    adam_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for the optimizer registered as ``name`` in HF training.

    * A PEFT model gets :func:`lit_optim.integrations.peft.lora_param_groups` (A/B learning rates
      with ``lora_plus_ratio``, default 16; ``embedding_lr``; ``orthogonalize_lora``).
    * Any other model gets the registry grouping (``use_muon`` split for the Muon family).
    * Then HF's weight-decay rule: parameters in :func:`hf_decay_parameter_names` get
      ``weight_decay``, the others 0.

    Every group carries ``"lit_group"`` (``"lora_A"``, ``"lora_B"``, ``"rest"`` ...) for logging.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    info = name if isinstance(name, OptimizerInfo) else get_optimizer_info(name)
    weight_decay = _check_lr_like("weight_decay", weight_decay)
    if info.grouping == "matrix" and _is_fsdp1(model):
        raise ValueError(
            f"{info.name!r} orthogonalizes whole weight matrices, but this model is wrapped in FSDP1 "
            "(torch.distributed.fsdp.FullyShardedDataParallel), which hands the optimizer flattened 1-D "
            "shards. Use FSDP2 (TrainingArguments(fsdp_config={'fsdp_version': 2})), DDP, or an "
            "elementwise optimizer."
        )
    if _peft.is_peft_model(model):
        groups = _peft.lora_param_groups(
            model,
            info,
            lr=lr,
            weight_decay=weight_decay,
            lora_plus_ratio=_peft.DEFAULT_LORA_PLUS_RATIO if lora_plus_ratio is None else lora_plus_ratio,
            embedding_lr=embedding_lr,
            orthogonalize_lora=orthogonalize_lora,
            adam_lr=adam_lr,
        )
    else:
        if lora_plus_ratio is not None or embedding_lr is not None:
            raise ValueError(
                "lora_plus_ratio / embedding_lr apply to PEFT models only; this model has no PEFT (LoRA) layers"
            )
        groups = [
            dict(g, lit_group=g.get("lit_group", "rest")) for g in _peft._registry_groups(info, model, weight_decay)
        ]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = hf_decay_parameter_names(model)
    out: list[dict[str, Any]] = []
    for g in groups:
        dec = [p for p in g["params"] if names.get(id(p)) in decay]
        nodec = [p for p in g["params"] if names.get(id(p)) not in decay]
        if dec:
            out.append({**g, "params": dec, "weight_decay": weight_decay})
        if nodec:
            out.append({**g, "params": nodec, "weight_decay": 0.0})
    if not out:
        raise ValueError(f"{info.name!r}: the model has no parameters that require grad")
    return out


def create_optimizer(
    model: nn.Module,
    name: str,
    args: TrainingArguments | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    lora_plus_ratio: float | None = None,
    embedding_lr: float | None = None,
    orthogonalize_lora: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer registered as ``name`` over :func:`optimizer_param_groups`.

    ``lr`` and ``weight_decay`` default to ``args.learning_rate`` and ``args.weight_decay`` (the
    optimizer's registered defaults without ``args``). Further keyword arguments go to the
    optimizer's constructor (e.g. ``betas=(0.9, 0.99)``, ``rho=0.04`` for Sophia).
    """
    info = get_optimizer_info(name)
    if args is not None and not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    if lr is None:
        lr = args.learning_rate if args is not None else info.default_lr
    if weight_decay is None:
        weight_decay = args.weight_decay if args is not None else info.defaults.get("weight_decay", 0.0)
    lr = _check_lr_like("lr", lr)
    groups = optimizer_param_groups(
        model,
        info,
        weight_decay,
        lr=lr,
        lora_plus_ratio=lora_plus_ratio,
        embedding_lr=embedding_lr,
        orthogonalize_lora=orthogonalize_lora,
        adam_lr=kwargs.get("adam_lr"),
    )
    ctor = dict(info.defaults)
    ctor.update(kwargs)
    ctor["lr"] = lr
    return info.cls(groups, **ctor)


def estimate_training_steps(args: TrainingArguments, train_dataset: Any = None) -> int | None:
    """Optimizer steps of a ``Trainer.train()`` run: ``args.max_steps`` when > 0, otherwise derived
    from ``len(train_dataset)``, the batch size, the number of processes, gradient accumulation and
    ``num_train_epochs`` as the Trainer does. None when neither is known."""
    if args.max_steps > 0:
        return int(args.max_steps)
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return None
    n = len(train_dataset)
    bs = args.train_batch_size
    batches = n // bs if args.dataloader_drop_last else math.ceil(n / bs)
    batches = math.ceil(batches / max(1, args.world_size))
    ga = args.gradient_accumulation_steps
    per_epoch = max(batches // ga + int(batches % ga > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


_NO_TOTAL_SCHEDULES = {"constant", "constant_with_warmup", "reduce_lr_on_plateau", "greedy"}


def create_optimizer_and_scheduler(
    model: nn.Module,
    name: str,
    args: TrainingArguments,
    *,
    num_training_steps: int | None = None,
    train_dataset: Any = None,
    **kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``::

        args = TrainingArguments("out", learning_rate=3e-4, weight_decay=0.1, max_steps=1000,
                                 lr_scheduler_type="cosine", warmup_steps=50)
        trainer = Trainer(model, args, train_dataset=ds,
                          optimizers=create_optimizer_and_scheduler(model, "adan", args))

    The optimizer comes from :func:`create_optimizer` (keyword arguments such as
    ``lora_plus_ratio=16`` or ``betas=...`` are passed on). The scheduler is HF's
    ``get_scheduler(args.lr_scheduler_type, ...)`` with ``args``' warm-up and
    ``args.lr_scheduler_kwargs``, over ``num_training_steps`` (default: ``args.max_steps`` or, when
    that is not set, derived from ``train_dataset`` as the Trainer does).

    Under FSDP the Trainer refuses ``optimizers=``; use :func:`optimizer_cls_and_kwargs` there.
    Pass the model as the Trainer will train it (on its device; for DDP, the unwrapped model).
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    optimizer = create_optimizer(model, name, args, **kwargs)
    total = num_training_steps
    if total is None:
        total = estimate_training_steps(args, train_dataset)
    sched_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if total is None and sched_type not in _NO_TOTAL_SCHEDULES:
        raise ValueError(
            f"lr_scheduler_type={sched_type!r} needs the number of training steps: set "
            "TrainingArguments(max_steps=...), or pass num_training_steps=... or train_dataset=..."
        )
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ValueError(f"num_training_steps must be an integer >= 1, got {total!r}")
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(total or 0),
        num_training_steps=total,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


class LitOptimizerFactory:
    """The optimizer-factory form that ``Trainer(optimizer_cls_and_kwargs=...)`` accepts: not an
    ``Optimizer`` subclass, so the Trainer calls ``LitOptimizerFactory()(model, **kwargs)`` with the
    model it is about to train (after FSDP wrapping when optimizer creation is delayed). The
    keyword arguments are those :func:`optimizer_cls_and_kwargs` returns: ``optimizer`` (registry
    name), ``lr``, ``weight_decay``, the LoRA options and the optimizer's constructor arguments."""

    def __call__(self, model: nn.Module, optimizer: str, **kwargs: Any) -> torch.optim.Optimizer:
        return create_optimizer(model, optimizer, None, **kwargs)


def optimizer_cls_and_kwargs(
    name: str,
    args: TrainingArguments | None = None,
    **kwargs: Any,
) -> tuple[type[LitOptimizerFactory], dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``::

        trainer = Trainer(model, args, train_dataset=ds,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("muon", args))

    ``lr`` and ``weight_decay`` are taken from ``args`` now (or given as keywords); the Trainer
    builds its own scheduler from ``args``. Works when the Trainer forbids ``optimizers=``
    (FSDP): the optimizer is then created from the wrapped model. The orthogonalized optimizers
    need whole matrices: FSDP2 (``fsdp_config={"fsdp_version": 2}``) keeps them (the optimizer is
    built before wrapping), FSDP1 flattens them and is refused with an explanation.
    """
    info = get_optimizer_info(name)  # validate the name now, not at train() time
    if args is not None and not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    kw = dict(kwargs)
    if "lr" not in kw:
        kw["lr"] = args.learning_rate if args is not None else info.default_lr
    if "weight_decay" not in kw:
        kw["weight_decay"] = args.weight_decay if args is not None else info.defaults.get("weight_decay", 0.0)
    _check_lr_like("lr", kw["lr"])
    _check_lr_like("weight_decay", kw["weight_decay"])
    return LitOptimizerFactory, {"optimizer": info.name, **kw}


# ----------------------------------------------------------------------------- curvature


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


_ESTIMATORS = ("gnb", "hutchinson")


class CurvatureTrainerMixin:
    """Runs a diagonal-Hessian estimate every ``curvature_every_n_steps`` optimizer steps inside
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

    Args:
        curvature_estimator: ``"gnb"``, ``"hutchinson"`` or None (the optimizer's
            ``hessian_estimator``: GNB for Sophia, Hutchinson for AdaHessian).
        curvature_every_n_steps: k, optimizer steps between estimates (Sophia's paper: 10).
        curvature_samples: label draws (GNB) or probes (Hutchinson) averaged per estimate.
        curvature_seed: seed of the probes / sampled labels.
    """

    def __init__(
        self,
        *args: Any,
        curvature_estimator: str | None = None,
        curvature_every_n_steps: int = 10,
        curvature_samples: int = 1,
        curvature_seed: int = 0,
        **kwargs: Any,
    ):
        if curvature_estimator is not None and curvature_estimator not in _ESTIMATORS:
            raise ValueError(f"curvature_estimator must be one of {[*_ESTIMATORS, None]}, got {curvature_estimator!r}")
        for arg, value in (
            ("curvature_every_n_steps", curvature_every_n_steps),
            ("curvature_samples", curvature_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an integer >= 1, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        if isinstance(curvature_seed, bool) or not isinstance(curvature_seed, int):
            raise TypeError(
                f"curvature_seed must be an integer, got {type(curvature_seed).__name__} {curvature_seed!r}"
            )
        self.curvature_estimator = curvature_estimator
        self.curvature_every_n_steps = curvature_every_n_steps
        self.curvature_samples = curvature_samples
        self.curvature_seed = curvature_seed
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
        from ..curvature import all_reduce_mean, gnb_diagonal, hutchinson_diagonal
        from ..functional.hutchinson import make_generator, probe_seed

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


# ----------------------------------------------------------------------------- callback twins


def _ckpt_dir(args: TrainingArguments, state: Any) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class LitCallback(TrainerCallback):
    """Base of the lit_optim ``TrainerCallback`` twins.

    * **Checkpoints.** HF saves a callback's state only as JSON (``ExportableState``) and restores
      it only with ``restore_callback_states_from_checkpoint=True``, by re-creating the callback.
      The twins instead write ``lit_optim_<name>.pt`` (``torch.save`` of :meth:`state_dict`; one
      file per process when there are several) into every checkpoint folder in ``on_save``, and
      read it back in ``on_train_begin`` of a resumed run (``trainer.train(resume_from_checkpoint=
      ...)``). Callbacks are not told which folder HF resumes from: :class:`LitTrainer` and
      :class:`CurvatureTrainer` pass it on; under a plain ``Trainer`` the callback looks in
      ``args.resume_from_checkpoint`` when it names a folder, then in
      ``<output_dir>/checkpoint-<global_step>`` (the folder of ``resume_from_checkpoint=True`` and of
      any checkpoint of this output_dir), and warns when neither holds its state.
      :meth:`load_checkpoint` loads from any folder.
    * **Logging.** Values to log wait in :meth:`pop_logs`. Under :class:`LitTrainer` /
      :class:`CurvatureTrainer` they are merged into each ``Trainer.log`` call *before* the
      reporting integrations (TensorBoard, W&B ...) see it. Under a plain ``Trainer`` the
      callback's ``on_log`` adds them to the logged dict and to ``state.log_history`` (reporting
      callbacks, which HF places before user callbacks, do not see them then).
    """

    #: file stem of the state saved in checkpoints
    name = "callback"

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._pending_eval: dict[str, float] = {}
        #: the folder a LitTrainer / CurvatureTrainer resumes from (set by their ``train()``)
        self.resume_dir: str | None = None

    # -- logging ---------------------------------------------------------------------------
    def pop_logs(self) -> dict[str, float]:
        out, self._pending = self._pending, {}
        return out

    def pop_eval_logs(self) -> dict[str, float]:
        out, self._pending_eval = self._pending_eval, {}
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        extra = self.pop_logs()
        if extra and logs is not None:
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _file(self, folder: str, args: TrainingArguments) -> str:
        suffix = f"_rank{args.process_index}" if args.world_size > 1 else ""
        return os.path.join(folder, f"lit_optim_{self.name}{suffix}.pt")

    def on_save(self, args, state, control, **kwargs):
        folder = _ckpt_dir(args, state)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
        if args.world_size > 1 or args.should_save:
            torch.save(self.state_dict(), self._file(folder, args))

    def load_checkpoint(self, folder: str, args: TrainingArguments) -> bool:
        """Load this callback's state from a checkpoint folder; False when it holds none."""
        path = self._file(folder, args)
        if not os.path.isfile(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return True

    def _restore_if_resuming(self, args: TrainingArguments, state: Any) -> bool:
        if state.global_step <= 0:
            return False
        candidates = []
        if self.resume_dir is not None:
            candidates.append(self.resume_dir)
        if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(_ckpt_dir(args, state))
        for folder in candidates:
            if self.load_checkpoint(folder, args):
                return True
        import warnings

        warnings.warn(
            f"{type(self).__name__}: training resumes at step {state.global_step} but no lit_optim_{self.name} state "
            f"was found in {candidates}; the callback starts afresh (call load_checkpoint(folder, args) to load it "
            "from elsewhere)",
            stacklevel=2,
        )
        return False


def _refuse_sharded(args: TrainingArguments, what: str) -> None:
    fsdp = getattr(args, "fsdp", None)
    if fsdp or getattr(args, "deepspeed", None):
        raise ValueError(
            f"{what} needs the whole gradient on every process (one device or DDP); FSDP / DeepSpeed shard it "
            "(TrainingArguments(fsdp=...) / deepspeed=... is set)"
        )


class GradClipMedianCallback(LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.GradClipMedianCallback`: clip the gradients at
    ``factor`` times a running median of past gradient norms (Schaipp, Garrigos, Simsekli & Gower,
    *SGD with Clipping is Secretly Estimating the Median Gradient*, arXiv:2402.12828); the maths is
    :class:`lit_optim.functional.grad_stats.MedianClipper`.

    It acts in ``on_pre_optimizer_step``, after the last backward of the step (and DDP's
    all-reduce), before ``optimizer.step()``. HF clips by norm *before* that hook whenever
    ``TrainingArguments.max_grad_norm > 0`` (the default is 1.0), which would clip a second time at
    a constant threshold, so this callback requires ``max_grad_norm=0`` and raises otherwise.
    With fp16 AMP it unscales the gradients first (through the optimizer's ``GradScaler``, which
    then does not unscale twice); bf16 needs nothing. FSDP and DeepSpeed are refused.

    Logged: ``grad_clip/grad_norm`` (before clipping), ``grad_clip/threshold``,
    ``grad_clip/clipped_fraction`` and, in coordinate modes, ``grad_clip/clipped_coord_fraction``
    (values of the last step before each log). Arguments: those of
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
        from ..functional.grad_stats import MedianClipper

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
                "mode='constant', threshold=... for constant clipping through this callback)"
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
        if self.log_stats:
            out = {"grad_clip/grad_norm": info["grad_norm"], "grad_clip/clipped_fraction": info["clipped_fraction"]}
            if math.isfinite(info["threshold"]):
                out["grad_clip/threshold"] = info["threshold"]
            if self.clipper.mode in ("coordinate", "constant_coordinate"):
                out["grad_clip/clipped_coord_fraction"] = info["clipped_coord_fraction"]
            self._pending = {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def state_dict(self) -> dict[str, Any]:
        return {"clipper": self.clipper.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state["clipper"])


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
        primary: the average written at the end: index, decay or label (default 0).
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
        primary: float | str = 0,
        trainable_only: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        write_at_end: bool = True,
        eval_fn: Any = None,
    ):
        from ..functional.averaging import MultiEMA

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
        from ..functional.averaging import MultiEMA

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


def _scale_lrs(optimizer: Any, scheduler: Any, factor: float) -> None:
    if factor == 1.0:
        return
    inner = unwrap_optimizer(optimizer)
    for group in inner.param_groups:
        for key in ("lr", "initial_lr", "max_lr"):
            v = group.get(key)
            if isinstance(v, torch.Tensor):
                v.mul_(factor)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                group[key] = v * factor
    inner_sched = getattr(scheduler, "scheduler", scheduler)
    for attr in ("base_lrs", "max_lrs"):
        vals = getattr(inner_sched, attr, None)
        if isinstance(vals, list):
            setattr(inner_sched, attr, [v * factor for v in vals])


class AdaptiveBatchSizeCallback(LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.AdaptiveBatchSizeCallback`: grow the effective batch
    during training as AdAdaGrad prescribes (Lau, Liu & Kolar, *AdAdaGrad: Adaptive Batch Size
    Schemes for Adaptive Gradient Methods*, arXiv:2402.11215), through HF's gradient accumulation;
    the maths is :mod:`lit_optim.functional.grad_stats` (tests, ``BatchSizeController``).

    Every ``check_every_n_steps`` optimizer steps the callback takes the gradients of the
    micro-batches of the step as samples, runs the test (``"norm"``, ``"inner_product"``,
    ``"coordinate"``) and, when it asks for a larger batch, raises
    ``args.gradient_accumulation_steps`` to ``ceil(b* / (micro_batch x processes))`` (capped by
    ``max_batch_size``; the batch never shrinks) and multiplies the learning rates by
    ``lr_scaling`` (``"none"``, ``"linear"`` for SGD, ``"sqrt"`` for Adam-type; Granziol et al.,
    JMLR 2022), base rates of the scheduler included.

    **Samples.** Every micro-batch of a checked step on every process, read by
    :class:`~lit_optim.functional.grad_stats.MicroBatchGradStats`'s gradient hooks, which see each
    micro-batch's gradient before it is accumulated, clipped or all-reduced (one norm per
    parameter while the gradient is in cache; no copy for the norm test). The mean gradient is
    read in ``on_pre_optimizer_step`` (times the number of processes under DDP). The tests are
    invariant to the loss scaling common to all samples (1/accumulation, token normalisation,
    AMP's loss scale, which is taken out when the gradients were unscaled). HF clips *before*
    ``on_pre_optimizer_step``: a step whose gradient HF clipped (``max_grad_norm > 0``) no longer
    holds the mean gradient, so it is not tested (counted in ``clipped_steps_skipped``, warned
    once); with ``max_grad_norm=0`` every checked step is tested.
    ``gradient_accumulation_steps x processes >= 2`` is required.

    **When the batch grows.** HF decides whether a micro-batch ends an accumulation by the
    micro-batch's index in the epoch modulo ``gradient_accumulation_steps``, so a new value is
    applied right after an optimizer step whose epoch position is a multiple of it (at the latest
    at the next epoch start). HF fixed the number of epochs from the *initial* batch when training
    began, so with a grown batch the run ends after that many passes over the data, with fewer
    optimizer steps than ``max_steps``. Resuming restores the accumulation, the controller and
    (through the optimizer and scheduler state) the scaled learning rates; HF positions the data
    of a resumed epoch with the initial accumulation, so after a growth the resumed run does not
    replay exactly the same batches. The micro-batch (``per_device_train_batch_size``) never
    changes: HF cannot rebuild its loader mid-training. DeepSpeed, FSDP and per-example statistics
    are not supported.

    Logged (at checked steps): ``adaptive_batch/batch_size``, ``/accumulation``,
    ``/required_batch_size``, ``/statistic``, ``/lr_factor``.
    """

    name = "adaptive_batch_size"

    def __init__(
        self,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float | None = None,
        coordinate_quantile: float = 1.0,
        *,
        max_batch_size: int,
        lr_scaling: str = "none",
        check_every_n_steps: int = 1,
        log_stats: bool = True,
    ):
        from ..functional.grad_stats import BatchSizeController

        super().__init__()
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {type(max_batch_size).__name__} {max_batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise TypeError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps!r}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps}")
        self._ctl_kwargs = {
            "test": test,
            "eta": eta,
            "theta": theta,
            "nu": nu,
            "coordinate_quantile": coordinate_quantile,
            "lr_scaling": lr_scaling,
        }
        BatchSizeController(1, 1, **self._ctl_kwargs)  # validates
        self.test = test
        self.max_batch_size = max_batch_size
        self.check_every_n_steps = check_every_n_steps
        self.log_stats = bool(log_stats)
        self.controller: Any = None
        self.micro_batch_size: int | None = None
        self.accumulation: int | None = None
        self.world_size: int | None = None
        self.pending_accumulation: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_result: Any = None
        self._params: list[torch.Tensor] = []
        self._stats: Any = None  # MicroBatchGradStats, reused across steps
        self._active: Any = None  # the stats collecting during the current step
        self._epoch_micro = 0
        self._args: TrainingArguments | None = None
        #: checked steps not tested because HF had clipped their gradient (max_grad_norm > 0)
        self.clipped_steps_skipped = 0

    @property
    def batch_size(self) -> int | None:
        if self.micro_batch_size is None:
            return None
        return self.micro_batch_size * self.accumulation * self.world_size

    def _controller(self, batch_size: int) -> Any:
        from ..functional.grad_stats import BatchSizeController

        return BatchSizeController(batch_size, max(self.max_batch_size, batch_size), **self._ctl_kwargs)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        _refuse_sharded(args, "AdaptiveBatchSizeCallback")
        self._args = args
        hf_accumulation = int(args.gradient_accumulation_steps)  # what HF positions a resumed epoch with
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.micro_batch_size = int(args.per_device_train_batch_size)
        self.world_size = int(args.world_size)
        self.accumulation = int(args.gradient_accumulation_steps)
        if self.accumulation * self.world_size < 2:
            raise ValueError(
                "AdaptiveBatchSizeCallback estimates the gradient noise from the spread of at least 2 micro-batch "
                f"gradients per step, but gradient_accumulation_steps={self.accumulation} on {self.world_size} "
                "process(es) gives fewer: use gradient_accumulation_steps >= 2 on one process"
            )
        if self.batch_size > self.max_batch_size:
            raise ValueError(
                f"max_batch_size must be >= the initial effective batch size {self.batch_size} (micro-batch "
                f"{self.micro_batch_size} x accumulation {self.accumulation} x {self.world_size} process(es)), "
                f"got {self.max_batch_size}"
            )
        self.controller = self._controller(self.batch_size)
        if self._restore_if_resuming(args, state):
            args.gradient_accumulation_steps = self.accumulation
        # where HF starts in the current epoch (it skips the batches already trained on)
        self._epoch_micro = 0
        if state.global_step > 0 and train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            n = len(train_dataloader)
            per_epoch = max(n // hf_accumulation + int(n % hf_accumulation > 0), 1)
            self._epoch_micro = (state.global_step % per_epoch) * hf_accumulation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_micro = 0
        self._apply_pending(args, force=True)

    def on_step_begin(self, args, state, control, **kwargs):
        from ..functional.grad_stats import MicroBatchGradStats

        if self._active is not None:  # a step that never reached the optimizer
            self._active.stop()
        self._active = None
        if (
            self.controller is not None
            and state.global_step % self.check_every_n_steps == 0
            and self.controller.batch_size < self.max_batch_size
        ):
            if self._stats is None:
                self._stats = MicroBatchGradStats(
                    self._params,
                    unit_size=self.micro_batch_size,
                    scale=1.0,
                    track_inner=self.test == "inner_product",
                    track_coordinate=self.test == "coordinate",
                )
            self._stats.start()
            self._active = self._stats

    def on_substep_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1
        if self._active is not None:
            self._active.after_backward()

    def _was_clipped(self, args: TrainingArguments) -> bool:
        if not args.max_grad_norm or args.max_grad_norm <= 0:
            return False
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return False
        norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        return norm >= args.max_grad_norm * (1 - 1e-4)

    @staticmethod
    def _unscaled_factor(optimizer: Any) -> float:
        """The AMP loss scale when the gradients were unscaled before this hook (the samples the
        hooks saw are still scaled), else 1."""
        scaler = getattr(optimizer, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        try:
            st = scaler._per_optimizer_states[id(unwrap_optimizer(optimizer))]
            unscaled = getattr(st.get("stage"), "name", "") == "UNSCALED"
        except (AttributeError, KeyError, TypeError):  # pragma: no cover - GradScaler internals changed
            unscaled = False
        return float(scaler.get_scale()) if unscaled else 1.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        from ..functional.grad_stats import flat_grads

        mb, self._active = self._active, None
        if mb is None:
            return
        mb.after_backward()  # the last micro-batch of the step
        if self._was_clipped(args):
            mb.stop()
            self.clipped_steps_skipped += 1
            if self.clipped_steps_skipped == 1:
                import warnings

                warnings.warn(
                    "AdaptiveBatchSizeCallback: HF clipped the gradient of a checked step (max_grad_norm="
                    f"{args.max_grad_norm}), so the step's mean gradient is unknown and the step is not tested; "
                    "set max_grad_norm=0 (or use GradClipMedianCallback) to test every step",
                    stacklevel=2,
                )
            return
        factor = self._unscaled_factor(optimizer)
        if self.world_size > 1 and _dist_ready():
            # DDP averaged the accumulated gradients: the sum over every sample of every rank
            total = flat_grads(self._params, torch.float64).mul_(self.world_size * factor)
            stats = mb.finalize(all_reduce=torch.distributed.all_reduce, total=total)
        elif factor != 1.0:
            stats = mb.finalize(total=flat_grads(self._params, torch.float64).mul_(factor))
        else:
            stats = mb.finalize()
        result = self.controller.observe(stats)
        self.last_result = result
        if result is None:
            return
        logs = {
            "adaptive_batch/required_batch_size": float(min(result.required_batch_size, 1e18)),
            "adaptive_batch/statistic": float(min(result.statistic, 1e18)),
        }
        target = self.controller.decide()
        if target > self.controller.batch_size:
            unit = self.micro_batch_size * self.world_size
            new_acc = max(self.accumulation, math.ceil(target / unit))
            new_acc = min(new_acc, max(self.accumulation, self.max_batch_size // unit))
            if new_acc > self.accumulation and new_acc != self.pending_accumulation:
                factor = self.controller.grow_to(unit * new_acc)
                _scale_lrs(optimizer, lr_scheduler, factor)
                self.pending_accumulation = new_acc
                self.history.append(
                    {
                        "step": float(state.global_step),
                        "batch_size": float(unit * new_acc),
                        "accumulation": float(new_acc),
                        "lr_factor": float(self.controller.lr_factor),
                    }
                )
        if self.log_stats:
            self._pending = {
                **logs,
                "adaptive_batch/batch_size": float(self.batch_size),
                "adaptive_batch/accumulation": float(self.accumulation),
                "adaptive_batch/lr_factor": float(self.controller.lr_factor),
            }

    def on_step_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1  # the last micro-batch of the step
        self._apply_pending(args, force=False)

    def _apply_pending(self, args: TrainingArguments, force: bool) -> None:
        new = self.pending_accumulation
        if new is None:
            return
        if force or self._epoch_micro % new == 0:
            self.accumulation = new
            self.pending_accumulation = None
            args.gradient_accumulation_steps = new
            if self.log_stats:
                self._pending.update(
                    {"adaptive_batch/batch_size": float(self.batch_size), "adaptive_batch/accumulation": float(new)}
                )

    def on_train_end(self, args, state, control, **kwargs):
        if self._active is not None:
            self._active.stop()
            self._active = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "world_size": self.world_size,
            "pending_accumulation": self.pending_accumulation,
            "controller": None if self.controller is None else self.controller.state_dict(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accumulation = int(state["accumulation"])
        self.pending_accumulation = state["pending_accumulation"]
        self.history = [dict(h) for h in state["history"]]
        if state["controller"] is not None:
            self.controller = self._controller(int(state["controller"]["batch_size"]))
            self.controller.load_state_dict(state["controller"])
        if int(state["world_size"]) != self.world_size or int(state["micro_batch_size"]) != self.micro_batch_size:
            # keep at least the effective batch reached before the restart
            unit = self.micro_batch_size * self.world_size
            self.accumulation = max(2 if self.world_size == 1 else 1, math.ceil(self.controller.batch_size / unit))
            self.pending_accumulation = None
            self.controller.batch_size = unit * self.accumulation


def _hf_forward(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(preds, target)`` of an HF model on a batch with ``labels``: classification logits
    ``(B, C)`` against ``labels (B,)``; for causal LM logits ``(B, T, V)`` the next-token
    predictions ``logits[:, :-1]`` against ``labels[:, 1:]`` (``-100`` is ignored by the metric)."""
    if "labels" not in batch:
        raise ValueError("StabilityGapCallback's default forward_fn needs 'labels' in the evaluation batches")
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out["logits"] if isinstance(out, dict) else out.logits
    labels = batch["labels"]
    if logits.dim() == labels.dim() + 1 and logits.dim() >= 3:  # token-level: shift for causal LM
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return logits, labels


class StabilityGapCallback(StabilityGapReport, LitCallback):
    r"""HF twin of :class:`lit_optim.callbacks.StabilityGapEvaluator`: continual evaluation of a
    task sequence every ``every_n_steps`` optimizer steps and the stability-gap metrics (De Lange,
    van de Ven & Tuytelaars, *Continual evaluation for lifelong learning: Identifying the stability
    gap*, ICLR 2023, arXiv:2205.13452); the maths is
    :class:`lit_optim.functional.continual_metrics.StabilityGapTracker`.

    .. code-block:: python

        cb = StabilityGapCallback([eval_ds_task0, eval_ds_task1], every_n_steps=5)
        for train_ds in (train_ds_task0, train_ds_task1):     # one train() per task
            Trainer(model, args, train_dataset=train_ds, callbacks=[cb]).train()
        print(cb.table()); cb.plot("gap.png")

    **Tasks.** ``task_fn(args, state) -> int`` names the task being trained; without it each
    ``train()`` call (that does not resume a checkpoint) is the next task. The iteration count runs
    across ``train()`` calls and Trainers.

    **When.** At the start of each task, every ``every_n_steps`` optimizer steps and at the end of
    each ``train()``; over the tasks seen so far (``eval_future=True``: all). The model is put in
    eval mode without gradients and its modes are restored.

    **Metric.** ``metric`` (a torchmetrics ``Metric``, cloned per task; default micro accuracy
    ignoring ``-100``) on ``forward_fn(model, batch) -> (preds, target)``; the default handles
    sequence classification and causal LM (next-token accuracy). ``task_data`` holds one
    ``DataLoader`` or dataset per task (datasets are batched with ``batch_size`` and
    ``collate_fn``, default HF's ``default_data_collator``, without shuffling). Under DDP each
    process evaluates every ``world_size``-th batch and torchmetrics synchronises the result; under
    FSDP / DeepSpeed (collective forward passes) every process runs every batch.

    **Output.** Each evaluation is appended to ``trainer.state.log_history`` as
    ``{prefix}/acc_task{k}``, ``avg_acc``, ``min_acc``, ``wc_acc`` with its ``step``; the latest
    values join the next ``Trainer.log`` (reaching ``report_to`` under :class:`LitTrainer`); task
    switches add the windowed forgetting and the gap rows. :meth:`summary`, :meth:`table`,
    :meth:`plot` report the whole run; the history is saved with the checkpoints.
    """

    name = "stability_gap"

    def __init__(
        self,
        task_data: Any,
        every_n_steps: int = 10,
        metric: Any = None,
        *,
        eval_future: bool = False,
        windows: Any = None,
        recovery_fraction: float = 0.9,
        task_fn: Any = None,
        forward_fn: Any = None,
        log_prefix: str = "stability",
        batch_size: int = 32,
        collate_fn: Any = None,
    ):
        from torch.utils.data import DataLoader

        from ..functional.continual_metrics import StabilityGapTracker

        super().__init__()
        if isinstance(task_data, (DataLoader, torch.utils.data.Dataset)) or not isinstance(task_data, (list, tuple)):
            raise TypeError("task_data must be a list with one DataLoader or dataset per task")
        if len(task_data) == 0:
            raise ValueError("task_data must hold at least one task, got 0")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        windows = tuple(windows) if windows is not None else (10 * every_n_steps,)
        for w in windows:
            if isinstance(w, bool) or not isinstance(w, int) or w <= every_n_steps:
                raise ValueError(
                    f"windows must be integers > every_n_steps={every_n_steps} (a window must hold 2 evaluations), "
                    f"got {w!r}"
                )
        if metric is not None:
            from torchmetrics import Metric

            if not isinstance(metric, Metric):
                raise TypeError(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        for fn_name, fn in (("task_fn", task_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{fn_name} must be callable, got {type(fn).__name__}")
        if collate_fn is None:
            from transformers import default_data_collator as collate_fn
        self.loaders = []
        for i, d in enumerate(task_data):
            if isinstance(d, DataLoader):
                self.loaders.append(d)
            elif hasattr(d, "__getitem__") and hasattr(d, "__len__"):
                self.loaders.append(DataLoader(d, batch_size=batch_size, shuffle=False, collate_fn=collate_fn))
            else:
                raise TypeError(f"task_data[{i}] must be a DataLoader or a map-style dataset, got {type(d).__name__}")
        self.every_n_steps = every_n_steps
        self.metric = metric
        self.eval_future = bool(eval_future)
        self.task_fn = task_fn
        self.forward_fn = forward_fn or _hf_forward
        self.log_prefix = log_prefix
        self.tracker = StabilityGapTracker(windows=windows, recovery_fraction=recovery_fraction)
        self.iteration = 0
        self._offset = 0
        self._fit_count = -1
        self._last_eval: int | None = None
        self._provisional: int | None = None
        self._metrics: list[Any] | None = None
        self._model: nn.Module | None = None
        self._state: Any = None
        self._args: TrainingArguments | None = None
        self._shard_batches = True
        self.eval_seconds: list[float] = []

    @property
    def num_tasks(self) -> int:
        return len(self.loaders)

    def _task(self, args: TrainingArguments, state: Any) -> int:
        task = self.task_fn(args, state) if self.task_fn is not None else self._fit_count
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"the current task is {task}, but task_data holds {self.num_tasks} tasks")
        return task

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model, self._state, self._args = model, state, args
        # a sharded model's forward is collective: every process then runs every batch
        self._shard_batches = not (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None))
        restored = self._restore_if_resuming(args, state)
        if restored:
            if self._provisional is not None and self._task(args, state) == self.tracker.current_task:
                # an end-of-train evaluation that an uninterrupted run would not have made
                self.tracker.records = [r for r in self.tracker.records if r[0] != self._provisional]
                self._last_eval = self.tracker.records[-1][0] if self.tracker.records else None
        else:
            self._fit_count += 1
        self._provisional = None
        self._offset = self.iteration - state.global_step
        self._switch_if_needed(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._switch_if_needed(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self.iteration = self._offset + state.global_step
        if self.iteration % self.every_n_steps == 0:
            self._evaluate(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._last_eval != self.iteration:
            self._evaluate(state)
            self._provisional = self.iteration

    def _switch_if_needed(self, args: TrainingArguments, state: Any) -> None:
        task = self._task(args, state)
        current = self.tracker.current_task
        if current == task:
            return
        self.iteration = self._offset + state.global_step
        self.tracker.start_task(task, self.iteration)
        if current is not None:
            self._log_task_end(state, current)
        if self._last_eval != self.iteration:
            self._evaluate(state)
        elif not self.eval_future:
            self._evaluate(state, tasks=[task])

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, tasks: Any) -> dict[int, float]:
        """Metric of ``model`` on the evaluation data of ``tasks`` (synchronised across processes)."""
        import copy

        world = torch.distributed.get_world_size() if (_dist_ready() and self._shard_batches) else 1
        rank = torch.distributed.get_rank() if (_dist_ready() and self._shard_batches) else 0
        device = next(model.parameters()).device
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        out: dict[int, float] = {}
        try:
            for task in tasks:
                metric = None if self._metrics is None else self._metrics[task]
                if metric is not None:
                    metric.reset()
                for i, batch in enumerate(self.loaders[task]):
                    if world > 1 and i % world != rank:
                        continue
                    if isinstance(batch, dict):
                        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    preds, target = self.forward_fn(model, batch)
                    if metric is None:
                        template = self.metric
                        if template is None:
                            from torchmetrics.classification import MulticlassAccuracy

                            template = MulticlassAccuracy(
                                num_classes=int(preds.shape[-1]), average="micro", ignore_index=-100
                            )
                        self._metrics = [copy.deepcopy(template) for _ in range(self.num_tasks)]
                        metric = self._metrics[task]
                    metric.to(preds.device)
                    metric.update(preds, target)
                if metric is None:
                    raise RuntimeError(f"task_data[{task}] yielded fewer batches than processes ({world})")
                value = metric.compute()
                out[task] = float(value.float().mean().item()) if isinstance(value, torch.Tensor) else float(value)
        finally:
            for m, mode in modes:
                m.training = mode
        return out

    def _evaluate(self, state: Any, tasks: Any = None) -> None:
        import time

        if self.tracker.current_task is None or self._model is None:
            return
        if tasks is None:
            tasks = list(range(self.num_tasks)) if self.eval_future else sorted(set(self.tracker.seen_tasks))
        t0 = time.perf_counter()
        accs = self.evaluate(self._model, tasks)
        self.eval_seconds.append(time.perf_counter() - t0)
        step = self.iteration
        for task, acc in accs.items():
            self.tracker.record(step, task, acc)
        self._last_eval = step
        metrics = {f"{self.log_prefix}/acc_task{t}": a for t, a in accs.items()}
        for name, value in (
            ("avg_acc", self.tracker.avg_acc(step)),
            ("min_acc", self.tracker.min_acc(step)),
            ("wc_acc", self.tracker.wc_acc(step)),
        ):
            if value is not None:
                metrics[f"{self.log_prefix}/{name}"] = value
        self._emit(state, metrics)

    def _log_task_end(self, state: Any, finished: int) -> None:
        metrics: dict[str, float] = {}
        for w in self.tracker.windows:
            v = self.tracker.windowed_forgetting(w)
            if v is not None:
                metrics[f"{self.log_prefix}/wf{w}"] = v
        for g in self.tracker.gaps():
            if g["switch_to"] == finished:
                key = f"{self.log_prefix}/gap_task{g['task']}_at_task{finished}"
                metrics[f"{key}/depth"] = g["depth"]
                metrics[f"{key}/steps_to_min"] = float(g["steps_to_min"])
                if g["steps_to_recover"] is not None:
                    metrics[f"{key}/steps_to_recover"] = float(g["steps_to_recover"])
        self._emit(state, metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # every evaluation already has its own log_history entry; only the logged dict gets them
        extra = self.pop_logs()
        if extra and logs is not None:
            logs.update(extra)

    def _emit(self, state: Any, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        if state is not None:
            state.log_history.append({**metrics, "step": state.global_step, "iteration": self.iteration})
        self._pending.update(metrics)

    # summary(), table(), plot(path), state_dict() and load_state_dict() come from StabilityGapReport


# ----------------------------------------------------------------------------- trainers


class LitTrainerMixin:
    """Merges the values the lit_optim callbacks want logged (:meth:`LitCallback.pop_logs`) into
    every ``Trainer.log`` call before the reporting integrations see it, reports the evaluation
    metrics of averaged weights after ``evaluate``, and tells the callbacks which checkpoint
    ``train(resume_from_checkpoint=...)`` resumes from."""

    def _lit_callbacks(self) -> list[LitCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, LitCallback)]  # type: ignore[attr-defined]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        for cb in self._lit_callbacks():
            cb.resume_dir = path if isinstance(path, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for cb in self._lit_callbacks():
            logs.update(cb.pop_logs())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)  # type: ignore[misc]
        extra: dict[str, float] = {}
        for cb in self._lit_callbacks():
            extra.update(cb.pop_eval_logs())
        if extra:
            # already in metrics and state.log_history (the callback put them there); report them
            self.control = self.callback_handler.on_log(self.args, self.state, self.control, dict(extra))  # type: ignore[attr-defined]
        return metrics


class LitTrainer(LitTrainerMixin, Trainer):
    """``transformers.Trainer`` that forwards what the lit_optim callbacks log to ``report_to``
    integrations (see :class:`LitCallback`). Otherwise identical to ``Trainer``."""


class CurvatureTrainer(CurvatureTrainerMixin, LitTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`CurvatureTrainerMixin` (and :class:`LitTrainerMixin`):
    Sophia / AdaHessian in HF training without touching the loop::

        args = TrainingArguments("out", learning_rate=2e-4, max_steps=1000, max_grad_norm=1.0)
        trainer = CurvatureTrainer(model=model, args=args, train_dataset=ds,
                                   optimizers=create_optimizer_and_scheduler(model, "sophia", args),
                                   curvature_every_n_steps=10)
        trainer.train()
    """
