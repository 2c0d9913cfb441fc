"""lit_optim optimizers: ``torch.optim.Optimizer`` subclasses with the papers' update rules."""

from ._base import LitOptimizer, NonFiniteGradientError, TensorListOps, optimizer_state_bytes
from ._lowrank import lowrank_groups
from .adabelief import AdaBelief
from .adabound import AdaBound
from .adago import AdaGO
from .adagrad import AdaGrad, AdaGradNorm
from .adahessian import AdaHessian
from .adan import Adan
from .auon import AuON, HybridAuON
from .dct_lowrank import DCTLowRank
from .diffgrad import DiffGrad
from .exadam import EXAdam
from .frugal import FRUGAL
from .lion import Lion
from .muon import Muon
from .normuon import NorMuon
from .root import ROOT
from .sinkgd import SinkGD
from .sophia import Sophia
from .subset_norm import SubsetNormAdam

__all__ = [
    "LitOptimizer",
    "NonFiniteGradientError",
    "TensorListOps",
    "optimizer_state_bytes",
    "AdaBelief",
    "AdaBound",
    "AdaGrad",
    "AdaGradNorm",
    "AdaHessian",
    "Adan",
    "DiffGrad",
    "EXAdam",
    "Lion",
    "Sophia",
    # memory-reduced (issue 5)
    "DCTLowRank",
    "FRUGAL",
    "SubsetNormAdam",
    "lowrank_groups",
    # orthogonalized family (issue 10)
    "Muon",
    "NorMuon",
    "AuON",
    "HybridAuON",
    "ROOT",
    "AdaGO",
    "SinkGD",
]
