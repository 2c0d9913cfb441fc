"""Step time of every lit_optim optimizer on GPT-like parameter shapes (~29.5M parameters), as a
ratio to torch.optim.AdamW(foreach=True) timed interleaved in the same process, next to the same
algorithm in pytorch_optimizer (and heavyball where it has it) when installed.

    .venv/bin/python -m benchmarks.step_time                 # all optimizers, CPU
    .venv/bin/python -m benchmarks.step_time --only adan,lion --reps 5
    .venv/bin/python -m benchmarks.step_time --device cuda   # on a GPU machine

Gradients are fixed random tensors (the optimizer step alone is timed, not forward/backward).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

import lit_optim

from .common import gpt_shapes, make_params, numel, steady_malloc, time_interleaved

# lit_optim name -> (pytorch_optimizer class name, kwargs)
PEERS = {
    "adabelief": ("AdaBelief", {}),
    "adan": ("Adan", {}),
    "diffgrad": ("DiffGrad", {}),
    "adabound": ("AdaBound", {}),
    "exadam": ("EXAdam", {}),
    "lion": ("Lion", {}),
}
# The orthogonalized family is compared with its peers (torch.optim.Muon, pytorch_optimizer's
# Muon/NorMuon/AdaGO, heavyball) by benchmarks/orthogonal_step_time.py, which builds the
# use_muon parameter groups those classes require.

SKIP_BY_DEFAULT = {"adam", "adamw", "sgd"}


def _default_names() -> list[str]:
    """Every registered optimizer but the torch baselines and the families another benchmark
    covers: orthogonalized / normalized (orthogonal_step_time.py), memory-reduced (memory.py)."""
    out = []
    for n in lit_optim.available_optimizers():
        family = lit_optim.get_optimizer_info(n).family
        if n in SKIP_BY_DEFAULT or family.startswith(("orthogonalized", "normalized", "memory-reduced")):
            continue
        out.append(n)
    return out


def _peer(name, params):
    cls_name, kw = PEERS.get(name, (None, {}))
    if cls_name is None:
        return None
    try:
        po = importlib.import_module("pytorch_optimizer")
    except ImportError:
        return None
    cls = getattr(po, cls_name, None)
    if cls is None:
        return None
    try:
        return cls(params, foreach=True, **kw)
    except TypeError:
        return cls(params, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (default: all registered but the "
                    "orthogonalized and memory-reduced families, which have their own benchmarks)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args(argv)
    malloc = steady_malloc()
    dtype = getattr(torch, args.dtype)
    shapes = gpt_shapes(layers=args.layers)
    names = [n for n in args.only.split(",") if n] or _default_names()
    print(f"# {numel(shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.dtype}, device={args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, steady malloc: {malloc}")
    base_params = make_params(shapes, dtype=dtype, device=args.device)
    base = torch.optim.AdamW(base_params, lr=1e-3, foreach=True)
    steps = {"adamw(foreach)": base.step}
    if args.device == "cpu" or args.device.startswith("cuda"):
        fused_params = make_params(shapes, dtype=dtype, device=args.device)
        try:
            fused = torch.optim.AdamW(fused_params, lr=1e-3, fused=True)
            fused.step()
            steps_fused = {"adamw(foreach)": base.step, "adamw(fused)": fused.step}
            t = time_interleaved(steps_fused, reps=args.reps, device=args.device)
            print(f"{'torch AdamW(fused)':<28} {t['adamw(fused)'] * 1e3:8.1f} ms  ratio {t['adamw(fused)'] / t['adamw(foreach)']:.2f}")
            del fused, fused_params
        except (RuntimeError, TypeError) as e:  # fused not available for this device/dtype
            print(f"torch AdamW(fused) unavailable: {e}")
    print(f"{'optimizer':<28} {'ms/step':>8}  {'/AdamW':>7}  {'peer ms':>8}  {'/AdamW':>7}  {'ours/peer':>9}")
    rows = []
    for name in names:
        info = lit_optim.get_optimizer_info(name)
        ps = make_params(shapes, dtype=dtype, device=args.device)
        try:
            opt = lit_optim.create_optimizer(ps, name)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:<28} could not be built on plain tensors: {e}")
            continue
        if info.curvature is not None and hasattr(opt, "update_hessian"):
            # one estimate per parameter, in the optimizer's own order (its groups reorder them)
            opt.update_hessian([p.grad.abs() for g in opt.param_groups for p in g["params"]])
        steps = {"adamw(foreach)": base.step, name: opt.step}
        peer = None
        if not args.no_peers:
            pps = make_params(shapes, dtype=dtype, device=args.device)
            try:
                peer = _peer(name, pps)
            except Exception as e:  # noqa: BLE001
                print(f"  (peer for {name} failed: {e})")
            if peer is not None:
                steps["peer"] = peer.step
        t = time_interleaved(steps, reps=args.reps, device=args.device)
        r = t[name] / t["adamw(foreach)"]
        line = f"{name:<28} {t[name] * 1e3:8.1f}  {r:7.2f}"
        if peer is not None:
            rp = t["peer"] / t["adamw(foreach)"]
            line += f"  {t['peer'] * 1e3:8.1f}  {rp:7.2f}  {t[name] / t['peer']:9.2f}"
        print(line, flush=True)
        rows.append((name, r))
        del opt, ps, peer
    return 0


if __name__ == "__main__":
    sys.exit(main())
