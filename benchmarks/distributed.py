"""Optimizers on FSDP2 shards at 1, 2 and 4 processes: per-rank step time, Newton-Schulz work,
bytes communicated and optimizer-state bytes, on the GPT shapes of ``benchmarks/step_time.py``
(~29.5M parameters).

    .venv/bin/python -m benchmarks.distributed                        # CPU, gloo, 1/2/4 processes
    .venv/bin/python -m benchmarks.distributed --small --procs 1,2 --reps 1   # smoke setting
    # a multi-GPU machine (NCCL, one process per GPU; the script spawns them itself):
    .venv/bin/python -m benchmarks.distributed --backend nccl --device cuda --procs 1,2,4,8 --reps 20

Each process holds every parameter as a DTensor sharded on dim 0 over a 1-D mesh (what
``fully_shard`` hands the optimizer) with a fixed random gradient shard, and times
``optimizer.step()`` alone (no forward/backward; a barrier before each step, the slowest rank's
median reported). One process holds regular tensors: the single-process baseline. Columns:

* ``step ms``: median wall time of one step on the slowest rank.
* ``NS ms / rank``: time in Newton-Schulz (``lit_optim.functional.newton_schulz.orthogonalize``,
  timed around each call) per step, on the busiest rank; ``NS mats / rank``: matrices it
  orthogonalized (``optimizer.last_ns_stats["local_matrices"]``, out of ``matrices``).
* ``sent MB / rank``: bytes one rank sends per step, counted by wrapping the ``torch.distributed``
  collectives in the worker (all_to_all: the pieces for other ranks; all_gather: its input to each
  other rank; all_reduce: 2(N-1)/N of the buffer, a ring; broadcast/reduce: the payload once per
  receiver); ``sent / params``: the total over all ranks divided by the bytes of all parameters.
* ``state MB / rank``: ``optimizer_state_bytes`` of the local shards; ``vs 1 proc``: ratio to one
  process.

Optimizers: adamw (torch), adan, muon, normuon, frugal (``--only`` to choose). The orthogonalized
optimizers get ``use_muon`` groups for the hidden matrices (embeddings and 1-D tensors in their
AdamW part); FRUGAL projects the hidden matrices (``project=True``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import socket
import statistics
import time
from typing import Any

import torch

from .common import gpt_shapes, numel, steady_malloc

DEFAULT = "adamw,adan,muon,normuon,frugal"
ORTHOGONAL = {"muon", "normuon", "auon", "hybrid_auon", "root", "adago", "sinkgd"}
LOWRANK = {"frugal", "subset_norm", "dct_lowrank"}


# ----------------------------------------------------------------------------- byte counting


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _install_counter(counter: dict[str, float]) -> None:
    """Wrap the ``torch.distributed`` collectives the optimizers call (``dist.<name>(...)``) so that
    each call adds the bytes this rank sends to ``counter["bytes"]``."""
    import torch.distributed as dist

    def size(group):
        return dist.get_world_size(group)

    def group_rank(group):
        return dist.get_rank(group) if group is not None else dist.get_rank()

    def all_reduce(a):
        n = size(a.get("group"))
        return 2 * (n - 1) / n * _nbytes(a["tensor"])

    def all_gather(a):
        return (size(a.get("group")) - 1) * _nbytes(a["tensor"])

    def all_gather_into_tensor(a):
        return (size(a.get("group")) - 1) * _nbytes(a["input_tensor"])

    def reduce_scatter_tensor(a):
        n = size(a.get("group"))
        return (n - 1) / n * _nbytes(a["input"])

    def all_to_all_single(a):
        inp, group = a["input"], a.get("group")
        n = size(group)
        splits = a.get("input_split_sizes")
        total = _nbytes(inp)
        if not splits:
            return total * (n - 1) / n
        row = total / max(inp.shape[0], 1) if inp.dim() else 0
        return total - splits[group_rank(group)] * row

    def all_to_all(a):
        me = group_rank(a.get("group"))
        return sum(_nbytes(t) for j, t in enumerate(a["input_tensor_list"]) if j != me)

    def broadcast(a):
        return (size(a.get("group")) - 1) * _nbytes(a["tensor"]) if dist.get_rank() == a["src"] else 0

    def reduce(a):
        return 0 if dist.get_rank() == a["dst"] else _nbytes(a["tensor"])

    def send(a):
        return _nbytes(a["tensor"])

    rules = {
        "all_reduce": all_reduce,
        "all_gather": all_gather,
        "all_gather_into_tensor": all_gather_into_tensor,
        "reduce_scatter_tensor": reduce_scatter_tensor,
        "all_to_all_single": all_to_all_single,
        "all_to_all": all_to_all,
        "broadcast": broadcast,
        "reduce": reduce,
        "send": send,
        "isend": send,
    }
    for name, rule in rules.items():
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_lit_counted", False):
            continue
        sig = inspect.signature(fn)

        def wrapped(*args, _fn=fn, _sig=sig, _rule=rule, **kwargs):
            try:
                bound = _sig.bind(*args, **kwargs)
                counter["bytes"] += float(_rule(bound.arguments))
                counter["calls"] += 1
            except Exception:  # noqa: BLE001 - counting must never break the call
                counter["uncounted"] += 1
            return _fn(*args, **kwargs)

        wrapped._lit_counted = True  # type: ignore[attr-defined]
        setattr(dist, name, wrapped)


def _install_ns_timer(timer: dict[str, float], device: str) -> None:
    """Time every Newton-Schulz call of the orthogonalized optimizers."""
    from lit_optim.optim import _orthogonal

    orig = _orthogonal.orthogonalize

    def timed(*args, **kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        timer["seconds"] += time.perf_counter() - t0
        return out

    _orthogonal.orthogonalize = timed


# ----------------------------------------------------------------------------- one worker


def _shapes(small: bool, layers: int):
    return gpt_shapes(vocab=256, d=64, layers=1) if small else gpt_shapes(layers=layers)


def _groups(name: str, params: list) -> Any:
    """The first two tensors are the token and position embeddings (see benchmarks/common.py)."""
    hidden = [p for i, p in enumerate(params) if p.ndim >= 2 and i >= 2]
    rest = [p for i, p in enumerate(params) if not (p.ndim >= 2 and i >= 2)]
    if name in ORTHOGONAL:
        return [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]
    if name in LOWRANK:
        return [{"params": hidden, "project": True}, {"params": rest, "project": False}]
    return params


def _make(shapes, world: int, mesh, device: str, seed: int = 0) -> list:
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.randn(s, generator=g) * 0.02
        grad = torch.randn(s, generator=g) * 1e-3
        p, grad = p.to(device), grad.to(device)
        if world > 1:
            p = distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None)
            grad = distribute_tensor(grad, mesh, [Shard(0)], src_data_rank=None)
        param = torch.nn.Parameter(p)
        param.grad = grad
        out.append(param)
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist

    import lit_optim
    from lit_optim.optim import optimizer_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    try:
        mesh = None
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(args.device, (world,))
        counter = {"bytes": 0.0, "calls": 0, "uncounted": 0}
        timer = {"seconds": 0.0}
        _install_counter(counter)
        _install_ns_timer(timer, args.device)
        shapes = _shapes(args.small, args.layers)
        rows = []
        for name in args.only.split(","):
            name = name.strip()
            params = _make(shapes, world, mesh, args.device)
            opt = lit_optim.create_optimizer(_groups(name, params), name)
            for _ in range(args.warmup):
                opt.step()
            counter.update(bytes=0.0, calls=0, uncounted=0)
            timer["seconds"] = 0.0
            times = []
            for _ in range(args.reps):
                dist.barrier()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            stats = dict(getattr(opt, "last_ns_stats", {}) or {})
            rows.append(
                {
                    "name": name,
                    "rank": rank,
                    "step": statistics.median(times),
                    "ns": timer["seconds"] / args.reps,
                    "ns_local": stats.get("local_matrices"),
                    "ns_total": stats.get("matrices"),
                    "sent": counter["bytes"] / args.reps,
                    "uncounted": counter["uncounted"],
                    "state": optimizer_state_bytes(opt),
                }
            )
            del opt, params
        queue.put(rows)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, args, queue), nprocs=world, start_method="spawn")
    rows = []
    for _ in range(world):
        rows.extend(queue.get())
    return rows


# ----------------------------------------------------------------------------- table


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=DEFAULT, help=f"comma-separated optimizer names (default {DEFAULT})")
    ap.add_argument("--procs", default="1,2,4", help="process counts (default 1,2,4)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="tiny GPT shapes (the smoke setting)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and args.backend != "nccl":
        ap.error("--device cuda needs --backend nccl")
    steady_malloc()
    shapes = _shapes(args.small, args.layers)
    param_bytes = numel(shapes) * 4
    procs = [int(x) for x in args.procs.split(",")]
    if args.device == "cuda" and max(procs) > torch.cuda.device_count():
        ap.error(f"--procs {args.procs} needs {max(procs)} GPUs, found {torch.cuda.device_count()}")
    results: dict[tuple[str, int], list[dict]] = {}
    for world in procs:
        for row in _run(world, args):
            results.setdefault((row["name"], world), []).append(row)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s) per process"
    print(
        f"# FSDP2 (Shard(0) DTensors) optimizer step on {numel(shapes) / 1e6:.2f}M parameters "
        f"({'small' if args.small else f'{args.layers}-layer GPT'} shapes), {args.backend}, {device}, "
        f"median of {args.reps}\n"
    )
    print(
        "| optimizer | procs | step ms | NS ms / rank | NS mats / rank | sent MB / rank | sent / params "
        "| state MB / rank | vs 1 proc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in [n.strip() for n in args.only.split(",")]:
        base = results.get((name, procs[0]))
        base_state = max(r["state"] for r in base) if base else None
        for world in procs:
            rows = results[(name, world)]
            step = max(r["step"] for r in rows)
            ns = max(r["ns"] for r in rows) if name in ORTHOGONAL else None
            local = [r["ns_local"] for r in rows if r["ns_local"] is not None]
            total = rows[0]["ns_total"]
            mats = f"{max(local)} of {total}" if local else "–"
            sent = max(r["sent"] for r in rows)
            total_sent = sum(r["sent"] for r in rows)
            state = max(r["state"] for r in rows)
            ratio = state / base_state if base_state else None
            print(
                f"| {name} | {world} | {step * 1e3:.1f} | {_fmt(ns and ns * 1e3, '.1f')} | {mats} "
                f"| {sent / 1e6:.2f} | {total_sent / param_bytes:.2f} | {state / 1e6:.1f} | {_fmt(ratio, '.2f')} |"
            )
        unc = sum(r["uncounted"] for w in procs for r in results[(name, w)])
        if unc:
            print(f"<!-- {name}: {unc} collective calls could not be counted -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
