"""LitOptimizer's DTensor mechanisms on 2 gloo processes (one launch): the non-finite check agrees
over the shards (a NaN on one rank only makes every rank raise, or skip, together), a Partial
gradient is refused, a tensor-parallel ``Shard(1)`` placement is exact for elementwise
optimizers, and state is created as DTensors laid out like the parameters."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ..callbacks.test_weight_averaging_ddp import run_in_two_processes

pytestmark = pytest.mark.ddp


def _worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    import lit_optim
    from lit_optim.optim import NonFiniteGradientError

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    res: dict = {}
    g = torch.Generator().manual_seed(0)
    full = torch.randn(5, 6, generator=g)
    grad_full = torch.randn(5, 6, generator=g)

    def make(placement):
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
        return p

    # state is a DTensor with the parameter's placement, created at construction
    p = make(Shard(0))
    opt = lit_optim.AdaBelief([p], lr=0.1)
    st = opt.state[p]["exp_avg"]
    res["state_is_dtensor"] = isinstance(st, DTensor) and tuple(st.placements) == (Shard(0),)

    # non-finite on rank 1 only: both ranks raise, no weight changes
    for mode in ("raise", "skip"):
        p = make(Shard(0))
        opt = lit_optim.AdaBelief([p], lr=0.1, nonfinite=mode)
        gr = grad_full.clone()
        gr[4, 0] = float("nan")  # row 4 lives on rank 1 (rows 0-2 on rank 0, 3-4 on rank 1)
        p.grad = distribute_tensor(gr, mesh, [Shard(0)])
        before = p.detach().to_local().clone()
        raised = False
        try:
            opt.step()
        except NonFiniteGradientError:
            raised = True
        res[f"{mode}_raised"] = raised
        res[f"{mode}_skipped"] = opt.skipped_steps
        res[f"{mode}_unchanged"] = bool(torch.equal(p.detach().to_local(), before))

    # tensor-parallel Shard(1): elementwise update equals the one-process update
    ref = torch.nn.Parameter(full.clone())
    ropt = lit_optim.Adan([ref], lr=0.1, weight_decay=0.01)
    p = make(Shard(1))
    opt = lit_optim.Adan([p], lr=0.1, weight_decay=0.01)
    for k in range(3):
        ref.grad = grad_full * (k + 1)
        p.grad = distribute_tensor(grad_full * (k + 1), mesh, [Shard(1)])
        ropt.step()
        opt.step()
    res["shard1_diff"] = float((p.full_tensor() - ref.detach()).abs().max())

    # a Partial gradient is refused with a message naming the placement
    p = make(Shard(0))
    opt = lit_optim.Lion([p])
    p.grad = DTensor.from_local(torch.ones(5, 6), mesh, [Partial()], run_check=False)
    try:
        opt.step()
        res["partial"] = "accepted"
    except TypeError as e:
        res["partial"] = str(e)

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def test_dtensor_base_mechanisms(tmp_path):
    out = str(tmp_path)
    run_in_two_processes(_worker, out)
    for r in (0, 1):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            res = json.load(f)
        assert res["state_is_dtensor"]
        assert res["raise_raised"] and res["raise_unchanged"]
        assert not res["skip_raised"] and res["skip_skipped"] == 1 and res["skip_unchanged"]
        assert res["shard1_diff"] < 1e-6
        assert "Partial placement" in res["partial"]
