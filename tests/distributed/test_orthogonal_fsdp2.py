"""The orthogonalized family under FSDP2 (``fully_shard``, DTensor ``Shard(0)`` parameters) on 2 CPU
processes with gloo, all cases in one launch: every optimizer, built with
``lit_optim.create_optimizer(model, name)``, trained 8 steps with each rank on half of the global
batch, ends where one process on the whole batch ends (relative difference <= 1e-4 in float32);
each rank orthogonalizes a share of the matrices and Muon communicates <= 2x the matrix bytes; a
sharded (distributed-checkpoint) save and load resumes exactly; HSDP-style and replicated
placements are exact; tensor-parallel placements are refused with a message naming the supported
ones.

The model has matrices whose first dimension is odd (7 x 5: rows 4 + 3), a 1 x 4 matrix (rank 1
holds an empty shard) and a stack of 3 expert matrices (3, 7, 4) sharded over its batch dimension
(2 + 1), next to an embedding, biases and a head that take the internal AdamW."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from ._spawn import FSDP2_MARKS

pytestmark = FSDP2_MARKS

STEPS = 8
BATCH = 16
CASES = [
    ("muon", {}),
    ("normuon", {"weight_decay": 0.1}),
    ("auon", {}),
    ("hybrid_auon", {}),
    ("root", {"lr": 0.01}),
    ("adago", {}),
    ("sinkgd", {"lr": 0.01}),
    ("muon", {"layerwise_noise_adaptive": True, "nesterov": False}),
    ("adago", {"layerwise_noise_adaptive": True}),
    ("sinkgd", {"layerwise_noise_adaptive": True, "lr": 0.01}),
]
CHECKPOINT_CASES = [("normuon", {"layerwise_noise_adaptive": True}), ("adago", {})]


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 7, 4) * 0.4)

    def forward(self, x):
        return torch.einsum("ni,eio->no", x, self.w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.inp = nn.Linear(5, 7)
        self.hid = nn.Linear(7, 7, bias=False)
        self.experts = Experts()
        self.squeeze = nn.Linear(4, 1)
        self.out = nn.Linear(1, 3)

    def forward(self, tokens):
        x = self.emb(tokens).mean(dim=1)
        for layer in (self.inp, self.hid, self.experts, self.squeeze):
            x = torch.tanh(layer(x))
        return self.out(x)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 9, (STEPS, BATCH, 4), generator=g), torch.randint(0, 3, (STEPS, BATCH), generator=g)


def _net():
    torch.manual_seed(0)
    return Net()


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    net = _net()
    for layer in (net.emb, net.inp, net.hid, net.experts, net.squeeze, net.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _train(net, opt, x, y, steps, rows=slice(None)):
    for t in steps:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[t, rows]), y[t, rows]).backward()
        opt.step()


def _full(p):
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _rel_diffs(net, ref):
    out = {}
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        a, b = _full(p), q.detach()
        out[name] = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return out


def _worker(out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import lit_optim

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    x, y = _data()
    res: dict = {"cases": [], "checkpoint": {}}

    def make(name, kw, sharded):
        net = _sharded(mesh) if sharded else _net()
        extra = {} if sharded else {"distributed": False}
        return net, lit_optim.create_optimizer(net, name, adam_lr=3e-3, **kw, **extra)

    # 1. every optimizer: FSDP2 on half batches == one process on the whole batch
    for name, kw in CASES:
        net, opt = make(name, kw, True)
        stats = []
        for t in range(STEPS):
            _train(net, opt, x, y, [t], half)
            stats.append(dict(opt.last_ns_stats))
        ref, ropt = make(name, kw, False)
        _train(ref, ropt, x, y, range(STEPS))
        states = [opt.state[p] for p in net.parameters()]
        mom = [s["momentum_buffer"] for s in states if "momentum_buffer" in s]
        matrix_bytes = sum(
            p.numel() * p.element_size() for g in opt.param_groups if g.get("use_muon") for p in g["params"]
        )
        res["cases"].append(
            {
                "name": name,
                "kw": kw,
                "diffs": _rel_diffs(net, ref),
                "stats": stats,
                "matrix_bytes": matrix_bytes,
                "momentum_is_sharded": all(isinstance(m, DTensor) and m.placements == (Shard(0),) for m in mom),
                "stat_keys_plain": [
                    k
                    for s in states
                    for k in ("second_moment", "sum_sq", "noise_sq")
                    if k in s and not isinstance(s[k], DTensor)
                ],
            }
        )

    # 2. sharded checkpoint: save after 4 steps, load into a fresh model and optimizer, continue
    ckpt_root = os.path.join(out, "ckpt")
    for name, kw in CHECKPOINT_CASES:
        net, opt = make(name, kw, True)
        _train(net, opt, x, y, range(STEPS), half)
        straight = [_full(p).clone() for p in net.parameters()]
        net, opt = make(name, kw, True)
        _train(net, opt, x, y, range(4), half)
        msd, osd = get_state_dict(net, opt)
        path = os.path.join(ckpt_root, name)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        net, opt = make(name, kw, True)
        msd, osd = get_state_dict(net, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(net, opt, x, y, range(4, STEPS), half)
        resumed = [_full(p) for p in net.parameters()]
        res["checkpoint"][name] = max(float((a - b).abs().max()) for a, b in zip(resumed, straight))

    # 3. placements: HSDP-style (Replicate, Shard(0)) on a 2-D mesh and fully replicated matrices are
    #    exact; Shard(1) (tensor parallel) and a 2-D sharding are refused
    mesh2 = init_device_mesh("cpu", (1, 2))
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(7, 6, generator=g)
    grads = [torch.randn(7, 6, generator=g) for _ in range(3)]
    for label, dmesh, placements in (
        ("hsdp", mesh2, [Replicate(), Shard(0)]),
        ("replicated", mesh, [Replicate()]),
    ):
        p = nn.Parameter(distribute_tensor(w0.clone(), dmesh, placements))
        q = nn.Parameter(w0.clone())
        opt = lit_optim.NorMuon([p], lr=0.05, layerwise_noise_adaptive=True)
        ref = lit_optim.NorMuon([q], lr=0.05, layerwise_noise_adaptive=True, distributed=False)
        for gr in grads:
            p.grad = distribute_tensor(gr.clone(), dmesh, placements)
            q.grad = gr.clone()
            opt.step()
            ref.step()
        res[label] = float((p.detach().full_tensor() - q.detach()).abs().max())
    for label, dmesh, placements in (
        ("shard1", mesh, [Shard(1)]),
        ("shard2d", mesh2, [Shard(0), Shard(1)]),
    ):
        p = nn.Parameter(distribute_tensor(w0.clone(), dmesh, placements))
        try:
            lit_optim.Muon([p])
            res[label] = "accepted"
        except TypeError as e:
            res[label] = str(e)
    # a Shard(1) parameter in a use_muon=False group takes AdamW on its shards: accepted and exact
    p = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(1)]))
    q = nn.Parameter(w0.clone())
    opt = lit_optim.Muon([{"params": [p], "use_muon": False}])
    ref = lit_optim.Muon([{"params": [q], "use_muon": False}])
    for gr in grads:
        p.grad = distribute_tensor(gr.clone(), mesh, [Shard(1)])
        q.grad = gr.clone()
        opt.step()
        ref.step()
    res["shard1_adamw"] = float((p.detach().full_tensor() - q.detach()).abs().max())

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    _worker(out)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    # the files are written: skip the interpreter's shutdown, where gloo's threads have been seen
    # to abort a finished worker
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_orthogonal_family_under_fsdp2_equals_one_process(tmp_path):
    out = str(tmp_path)
    # fork: the workers inherit the imported modules (a spawned worker re-imports torch, ~10 s)
    ctx = mp.start_processes(_entry, args=(_free_port(), out), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError("the 2 FSDP2 worker processes did not finish within 300 s")
    ranks = []
    for r in (0, 1):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    for case0, case1 in zip(ranks[0]["cases"], ranks[1]["cases"]):
        label = f"{case0['name']}{case0['kw']}"
        for res in (case0, case1):
            worst = max(res["diffs"].values())
            assert worst <= 1e-4, (label, res["diffs"])
            assert res["momentum_is_sharded"], label
        if case0["name"] == "normuon":
            assert case0["stat_keys_plain"].count("second_moment") == 4, case0["stat_keys_plain"]
        if case0["name"] in ("muon", "normuon", "root", "adago", "hybrid_auon"):
            for s0, s1 in zip(case0["stats"], case1["stats"]):
                total = s0["matrices"]
                assert s1["matrices"] == total > 0 and s0["world_size"] == 2, (label, s0, s1)
                # the work is divided: each rank orthogonalizes a share, together all of them
                assert 0 < s0["local_matrices"] < total and 0 < s1["local_matrices"] < total, (label, s0, s1)
                assert s0["local_matrices"] + s1["local_matrices"] == total
        if case0["name"] == "muon" and not case0["kw"]:
            for s0, s1 in zip(case0["stats"], case1["stats"]):
                sent = s0["sent_bytes"] + s1["sent_bytes"]
                assert sent == s0["received_bytes"] + s1["received_bytes"]
                # one gather and one scatter: at most 2x the matrix bytes (plus 8-byte headers and padding)
                assert 0 < sent <= 2 * case0["matrix_bytes"] + 64, (sent, case0["matrix_bytes"])
    for r in (0, 1):
        res = ranks[r]
        for name, diff in res["checkpoint"].items():
            assert diff == 0.0, (name, diff)
        assert res["hsdp"] < 1e-6 and res["replicated"] < 1e-6, res
        assert res["shard1_adamw"] < 1e-6
        for label in ("shard1", "shard2d"):
            msg = res[label]
            assert "Shard(0)" in msg and "not supported" in msg and "use_muon=False" in msg, msg
