"""Optimizers for HF's ``Trainer``: parameter groups (registry grouping, PEFT/LoRA groups, HF's
weight-decay rule) and the two routes, ``Trainer(optimizers=create_optimizer_and_scheduler(...))``
and ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(...))``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..._validation import check_non_negative
from ...registry import OptimizerInfo, get_optimizer_info
from .. import peft as _peft
from ._common import Trainer, TrainingArguments, transformers


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
    weight_decay = check_non_negative("weight_decay", weight_decay)
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
    lr = check_non_negative("lr", lr)
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
    (FSDP). With FSDP2 (``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2}``) the Trainer
    builds the optimizer on the unsharded model, then accelerate shards the model (``fully_shard``
    per transformer block and on the model) and replaces every parameter of the optimizer's groups
    by its sharded DTensor; lit_optim optimizers then drop the whole-size state built at
    construction and run on the shards, every optimizer with the single-process result (the
    orthogonalized family gathers each matrix on one owner rank; see the optimizers' docstrings),
    with sharded state and sharded checkpoints. FSDP1 flattens the parameters and is refused for
    the optimizers that need their shapes, with an explanation.
    """
    info = get_optimizer_info(name)  # validate the name now, not at train() time
    if args is not None and not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    kw = dict(kwargs)
    if "lr" not in kw:
        kw["lr"] = args.learning_rate if args is not None else info.default_lr
    if "weight_decay" not in kw:
        kw["weight_decay"] = args.weight_decay if args is not None else info.defaults.get("weight_decay", 0.0)
    check_non_negative("lr", kw["lr"])
    check_non_negative("weight_decay", kw["weight_decay"])
    return LitOptimizerFactory, {"optimizer": info.name, **kw}
