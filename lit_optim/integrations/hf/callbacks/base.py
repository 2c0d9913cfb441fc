"""Base of the lit_optim ``TrainerCallback`` twins: checkpoint files and logging."""

from __future__ import annotations

import os
from typing import Any

import torch

from .._common import TrainerCallback, TrainingArguments, _ckpt_dir


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
