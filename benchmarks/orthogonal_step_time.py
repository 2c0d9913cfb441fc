"""Step time of the orthogonalized family on GPT-like parameter shapes, as a ratio to
torch.optim.AdamW(foreach=True) timed interleaved in the same process, side by side with
torch.optim.Muon, pytorch_optimizer's Muon / NorMuon / AdaGO and heavyball's Muon (when
installed), all with 5 Newton-Schulz steps; plus optimizer-state bytes per parameter.

    .venv/bin/python -m benchmarks.orthogonal_step_time               # CPU, ~30M parameters
    .venv/bin/python -m benchmarks.orthogonal_step_time --reps 3 --layers 4
    .venv/bin/python -m benchmarks.orthogonal_step_time --device cuda # GPU (bf16 Newton-Schulz rows)
    .venv/bin/python -m benchmarks.orthogonal_step_time --ranks 2     # DDP: NS work shared by 2 CPU processes

Hidden matrices (QKV, attention projection, MLP) take the orthogonalized update; embeddings,
norms and biases the internal AdamW (for torch.optim.Muon and heavyball: a torch AdamW(foreach)
next to it, timed together). torch.optim.Muon, pytorch_optimizer and heavyball iterate in
bfloat16, so the "bf16" rows of lit_optim are the like-for-like comparison; the "fp32" rows
show lit_optim's default (the parameter's precision). Gradients are fixed random tensors: only
the optimizer step is timed.

"NS compiled" rows run the Newton-Schulz iteration compiled with torch.compile
(``lit_optim.optim._compiled.compiled_newton_schulz``); "heavyball Muon (compile_step)" compiles
heavyball's whole step (its default compiles the elementwise parts only). ``first s`` is the wall
time of the first step (compilation included).
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

import lit_optim
from lit_optim.optim import _compiled, optimizer_state_bytes

from .common import (
    device_name,
    gpt_shapes,
    make_params,
    markdown_table,
    numel,
    steady_malloc,
    time_interleaved,
    timed_first_steps,
)


def split(params):
    """(hidden matrices, the rest): the first two tensors are the token and position embeddings."""
    hidden = [p for i, p in enumerate(params) if p.ndim >= 2 and i >= 2]
    rest = [p for i, p in enumerate(params) if not (p.ndim >= 2 and i >= 2)]
    return hidden, rest


def groups(params):
    hidden, rest = split(params)
    return [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]


class Pair:
    """Two optimizers stepped together (a matrix optimizer next to an AdamW for the rest)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def step(self):
        self.a.step()
        self.b.step()


class CompiledNS:
    """Steps ``opt`` with the compiled Newton-Schulz iteration."""

    def __init__(self, opt, device):
        self.opt, self.device = opt, device

    def step(self):
        with _compiled.compiled_newton_schulz(self.device, force=True):
            self.opt.step()


class RestoreGrads:
    """heavyball consumes ``.grad`` in its step (sets it to None); put the fixed gradients back
    before every step so that each timed step does the full work."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params
        self.grads = [p.grad for p in params]

    def step(self):
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt.step()


def build(kind, params, device):
    """An object with .step() for candidate ``kind``, or None when the library is missing."""
    hidden, rest = split(params)
    if kind.startswith("lit:"):
        _, name, prec, *mode = kind.split(":")
        kw = {}
        if prec == "bf16" and name not in ("auon", "sinkgd"):
            kw["ns_dtype"] = "bfloat16"
        opt = lit_optim.get_optimizer_info(name).cls(groups(params), **kw)
        return CompiledNS(opt, device) if mode == ["nsc"] else opt
    if kind == "torch:muon":
        muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0, ns_steps=5)
        return Pair(muon, torch.optim.AdamW(rest, lr=3e-4, foreach=True))
    if kind.startswith("po:"):
        try:
            po = importlib.import_module("pytorch_optimizer")
        except ImportError:
            return None
        cls = getattr(po, kind.split(":")[1], None)
        if cls is None:
            return None
        return cls(
            [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], ns_steps=5, foreach=True
        )
    if kind == "heavyball:muon":
        try:
            hb = importlib.import_module("heavyball")
        except ImportError:
            return None
        muon = hb.Muon(hidden, lr=0.02, compile_step=False)
        return RestoreGrads(Pair(muon, torch.optim.AdamW(rest, lr=3e-4, foreach=True)), hidden)
    if kind == "heavyball:muon-compiled":
        try:
            hb = importlib.import_module("heavyball")
        except ImportError:
            return None
        muon = hb.Muon(hidden, lr=0.02, compile_step=True)
        return RestoreGrads(Pair(muon, torch.optim.AdamW(rest, lr=3e-4, fused=True)), hidden)
    raise ValueError(kind)


ROWS = [
    # (label, candidate, peer it is compared with)
    ("torch.optim.Muon (bf16 NS)", "torch:muon", None),
    ("lit Muon bf16", "lit:muon:bf16", "torch:muon"),
    ("lit Muon bf16 NS compiled", "lit:muon:bf16:nsc", "torch:muon"),
    ("lit Muon fp32", "lit:muon:fp32", None),
    ("pytorch_optimizer Muon", "po:Muon", None),
    ("lit Muon bf16 vs po", "lit:muon:bf16", "po:Muon"),
    ("heavyball Muon", "heavyball:muon", None),
    ("lit Muon bf16 vs heavyball", "lit:muon:bf16", "heavyball:muon"),
    ("heavyball Muon (compile_step)", "heavyball:muon-compiled", None),
    ("lit Muon bf16 NS compiled vs hb", "lit:muon:bf16:nsc", "heavyball:muon-compiled"),
    ("lit NorMuon bf16", "lit:normuon:bf16", "po:NorMuon"),
    ("lit NorMuon fp32", "lit:normuon:fp32", None),
    ("lit AdaGO bf16", "lit:adago:bf16", "po:AdaGO"),
    ("lit AdaGO fp32", "lit:adago:fp32", None),
    ("lit AuON", "lit:auon:fp32", None),
    ("lit HybridAuON bf16", "lit:hybrid_auon:bf16", None),
    ("lit HybridAuON fp32", "lit:hybrid_auon:fp32", None),
    ("lit ROOT bf16", "lit:root:bf16", None),
    ("lit ROOT fp32", "lit:root:fp32", None),
    ("lit SinkGD", "lit:sinkgd:fp32", None),
]


def state_report(shapes, device):
    """Optimizer-state bytes per hidden-matrix parameter and per model parameter after one step."""
    print("\n# optimizer state after one step (bytes per parameter)")
    print(f"{'optimizer':<22} {'matrices':>9} {'model':>7}")
    for name in ["muon", "normuon", "auon", "hybrid_auon", "root", "adago", "sinkgd"]:
        ps = make_params(shapes, device=device)
        opt = lit_optim.get_optimizer_info(name).cls(groups(ps))
        opt.step()
        hidden, _ = split(ps)
        mat_bytes = sum(
            v.untyped_storage().nbytes() for p in hidden for v in opt.state[p].values() if isinstance(v, torch.Tensor)
        )
        n_hidden = sum(p.numel() for p in hidden)
        print(f"{name:<22} {mat_bytes / n_hidden:9.2f} {optimizer_state_bytes(opt) / numel(shapes):7.2f}")
    ps = make_params(shapes, device=device)
    ad = torch.optim.AdamW(ps, foreach=True)
    ad.step()
    print(f"{'torch AdamW':<22} {8.0:9.2f} {optimizer_state_bytes(ad) / numel(shapes):7.2f}")


def run_table(args) -> None:
    shapes = gpt_shapes(d=args.width, layers=args.layers)
    device = args.device
    print(
        f"# {numel(shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors (hidden matrices: "
        f"{sum(p.numel() for p in split(make_params(shapes))[0]) / 1e6:.1f}M), device={device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} interleaved steps"
    )
    base = torch.optim.AdamW(make_params(shapes, device=device), lr=1e-3, foreach=True)
    print(
        f"{'optimizer':<32} {'ms/step':>9} {'/AdamW':>7} {'first s':>8}   {'peer':<24} {'ms/step':>9} {'/AdamW':>7} "
        f"{'ours/peer':>9}"
    )
    header = ["optimizer", "ms/step", "/AdamW", "first step s", "peer", "peer ms/step", "peer /AdamW", "ours/peer"]
    rows = []
    only = [s for s in args.only.split(",") if s]
    skip = set() if (device != "cpu" or args.heavyball_compile_step) else {"heavyball:muon-compiled"}
    for label, cand, peer in ROWS:
        if only and not any(o in cand or o in label.lower() for o in only):
            continue
        if cand in skip or peer in skip:
            continue
        kinds = (cand, peer or "")
        if args.no_heavyball and any(k.startswith("heavyball") for k in kinds):
            continue
        if args.no_compiled and any(k.endswith(":nsc") for k in kinds):
            continue
        c = build(cand, make_params(shapes, device=device), device)
        if c is None:
            print(f"{label:<32} not installed")
            continue
        first = timed_first_steps(c.step, 1, device)
        steps = {"base": base.step, "cand": c.step}
        p = None
        if peer is not None:
            p = build(peer, make_params(shapes, device=device), device)
            if p is not None:
                timed_first_steps(p.step, 1, device)
                steps["peer"] = p.step
        t = time_interleaved(steps, reps=args.reps, warmup=1, device=device)
        line = f"{label:<32} {t['cand'] * 1e3:9.1f} {t['cand'] / t['base']:7.2f} {first:8.1f}"
        r = [label, f"{t['cand'] * 1e3:.1f}", f"{t['cand'] / t['base']:.2f}", f"{first:.1f}"]
        if p is not None:
            line += f"   {peer:<24} {t['peer'] * 1e3:9.1f} {t['peer'] / t['base']:7.2f} {t['cand'] / t['peer']:9.2f}"
            r += [peer, f"{t['peer'] * 1e3:.1f}", f"{t['peer'] / t['base']:.2f}", f"{t['cand'] / t['peer']:.2f}"]
        else:
            r += ["-", "-", "-", "-"]
        rows.append(r)
        print(line, flush=True)
        del c, p
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### Orthogonalized family: step time ({device_name(device)})\n\n")
            f.write(f"{numel(shapes) / 1e6:.1f}M parameters, torch {torch.__version__}, median of {args.reps} steps\n\n")
            f.write(markdown_table(header, rows))
    if not args.no_state:
        state_report(shapes, device)


# ----------------------------------------------------------------------------------- DDP scaling


def _ddp_worker(rank, world, port, layers, reps, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shapes = gpt_shapes(layers=layers)
        opt = lit_optim.Muon(groups(make_params(shapes)), ns_dtype="bfloat16")
        opt.step()
        dist.barrier()
        ts, cpu = [], []
        for _ in range(reps):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            cpu.append(time.process_time() - c0)
            dist.barrier()
            ts.append(time.perf_counter() - t0)
        out.put((rank, sorted(ts)[len(ts) // 2], sorted(cpu)[len(cpu) // 2], dict(opt.last_ns_stats)))
    finally:
        dist.destroy_process_group()


def run_ddp(args) -> None:
    """Wall time and CPU time of one Muon step: 1 process vs ``args.ranks`` gloo processes (1 thread each)."""
    import torch.multiprocessing as mp

    shapes = gpt_shapes(layers=args.layers)
    torch.set_num_threads(1)
    single = lit_optim.Muon(groups(make_params(shapes)), ns_dtype="bfloat16", distributed=False)
    single.step()
    ts, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        single.step()
        cpu.append(time.process_time() - c0)
        ts.append(time.perf_counter() - t0)
    t1, c1 = sorted(ts)[len(ts) // 2], sorted(cpu)[len(cpu) // 2]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _ddp_worker, args=(args.ranks, port, args.layers, args.reps, q), nprocs=args.ranks, start_method="spawn"
    )
    rows = sorted(q.get() for _ in range(args.ranks))
    print(
        f"# Muon (bf16 NS) step on {numel(shapes) / 1e6:.1f}M parameters, 1 thread per process, median of {args.reps}"
    )
    print(f"1 process:            wall {t1 * 1e3:8.1f} ms   cpu {c1 * 1e3:8.1f} ms")
    for rank, tn, cn, stats in rows:
        print(
            f"rank {rank} of {args.ranks} (gloo):  wall {tn * 1e3:8.1f} ms   cpu {cn * 1e3:8.1f} ms   "
            f"orthogonalized {stats['local_matrices']} of {stats['matrices']} matrices"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8, help="transformer layers (8: ~29.5M parameters)")
    ap.add_argument("--width", type=int, default=512, help="model width d (default 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated substrings of the rows to run")
    ap.add_argument("--no-state", action="store_true", help="skip the state-memory table")
    ap.add_argument("--ranks", type=int, default=0, help="measure the DDP speed-up with this many CPU processes")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--markdown", default="", help="also append the table, in Markdown, to this file")
    ap.add_argument("--no-heavyball", action="store_true", help="leave out the rows with heavyball")
    ap.add_argument("--no-compiled", action="store_true", help="leave out the compiled Newton-Schulz rows")
    ap.add_argument("--heavyball-compile-step", action="store_true",
                    help="on CPU too, time heavyball's compile_step=True Muon (slow to compile on a CPU)")
    args = ap.parse_args(argv)
    steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ranks > 1:
        run_ddp(args)
    else:
        run_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
