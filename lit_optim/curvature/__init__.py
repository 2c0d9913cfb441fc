"""Curvature estimators usable in a plain PyTorch loop (no Trainer needed).

* :func:`hutchinson_diagonal`, :func:`hutchinson_trace`: Hutchinson estimates from Hessian-vector
  products (double backward by ``torch.autograd.grad``; never ``backward(create_graph=True)``).
* :func:`gnb_diagonal`: Gauss-Newton-Bartlett diagonal (labels sampled from the model, one ordinary
  backward, works through fused attention).
* :func:`top_hessian_eigenvalue`: power iteration.
* :func:`block_average`: ADAHESSIAN's spatial / block averaging.
* :func:`all_reduce_mean`: average estimates over DDP processes.
* FSDP2 (DTensor parameters): :func:`gnb_diagonal` runs on the shards (see
  :mod:`lit_optim.curvature.sharded`); the double-backward estimators raise
  :class:`ShardedDoubleBackwardError`.

The Lightning side is :class:`lit_optim.callbacks.HessianDiagCallback`; the consumers are
:class:`lit_optim.Sophia` and :class:`lit_optim.AdaHessian` (``optimizer.update_hessian(...)``).
"""

from ..functional.hutchinson import DoubleBackwardError, probe_seed
from .averaging import block_average
from .distributed import all_reduce_mean, world_size
from .eigen import EigenResult, top_hessian_eigenvalue
from .gnb import gnb_diagonal
from .hutchinson import hutchinson_diagonal, hutchinson_trace
from .sharded import ShardedDoubleBackwardError

__all__ = [
    "DoubleBackwardError",
    "EigenResult",
    "ShardedDoubleBackwardError",
    "all_reduce_mean",
    "block_average",
    "gnb_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "probe_seed",
    "top_hessian_eigenvalue",
    "world_size",
]
