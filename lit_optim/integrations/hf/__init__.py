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

Layout: :mod:`.optimizers` (parameter groups, optimizer and scheduler factories),
:mod:`.curvature` (:class:`CurvatureTrainerMixin`), :mod:`.callbacks` (:class:`LitCallback` and one
module per ``TrainerCallback`` twin), :mod:`.trainer` (:class:`LitTrainer`, :class:`CurvatureTrainer`);
:mod:`._common` holds the helpers they share. Import everything from ``lit_optim.integrations.hf``.
"""

from __future__ import annotations

from ._common import unwrap_optimizer
from .callbacks import (
    AdaptiveBatchSizeCallback,
    GradClipMedianCallback,
    LitCallback,
    StabilityGapCallback,
    WeightAveragingCallback,
)
from .curvature import CurvatureTrainerMixin
from .optimizers import (
    LitOptimizerFactory,
    create_optimizer,
    create_optimizer_and_scheduler,
    estimate_training_steps,
    hf_decay_parameter_names,
    optimizer_cls_and_kwargs,
    optimizer_param_groups,
)
from .trainer import CurvatureTrainer, LitTrainer, LitTrainerMixin

__all__ = [
    "AdaptiveBatchSizeCallback",
    "CurvatureTrainer",
    "CurvatureTrainerMixin",
    "GradClipMedianCallback",
    "LitCallback",
    "LitOptimizerFactory",
    "LitTrainer",
    "LitTrainerMixin",
    "StabilityGapCallback",
    "WeightAveragingCallback",
    "create_optimizer",
    "create_optimizer_and_scheduler",
    "estimate_training_steps",
    "hf_decay_parameter_names",
    "optimizer_cls_and_kwargs",
    "optimizer_param_groups",
    "unwrap_optimizer",
]
