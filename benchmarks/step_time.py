"""Step time of every lit_optim optimizer on GPT-like parameter shapes (~29.5M parameters), as a
ratio to torch.optim.AdamW(foreach=True) timed interleaved in the same process, for the
multi-tensor path and the compiled path (``fused=True``), next to torch's fused AdamW, heavyball's
compiled AdamW and the same algorithm in pytorch_optimizer (when installed).

    .venv/bin/python -m benchmarks.step_time                 # all optimizers, CPU
    .venv/bin/python -m benchmarks.step_time --only adan,lion --reps 5
    .venv/bin/python -m benchmarks.step_time --device cuda   # on a GPU machine
    .venv/bin/python -m benchmarks.step_time --fused off     # the multi-tensor path only (no compiling)

Columns: ``ms`` median step time; ``/AdamW`` ratio to torch AdamW(foreach); ``/fusedAdamW`` ratio
to torch AdamW(fused=True); ``GB/s`` achieved bandwidth, the bytes a step must move (parameters
read and written, gradients read, state read and written) divided by the step time, and ``BW/fused``
that bandwidth as a fraction of torch fused AdamW's; ``compile s`` the wall time of the first two
steps of the compiled path (compilation included; 0.x when torch's on-disk cache already held the
kernels). heavyball has no Adan, Lion, ...: its compiled AdamW is the reference row for all of them.

Gradients are fixed random tensors (the optimizer step alone is timed, not forward/backward).
lit_optim steps include the non-finite-gradient check (``nonfinite="raise"``) unless
``--nonfinite ignore``; torch, heavyball and pytorch_optimizer do no such check.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import torch

import lit_optim
from lit_optim.optim import _compiled

from .common import (
    RestoreGrads,
    device_name,
    gpt_shapes,
    make_params,
    markdown_table,
    numel,
    steady_malloc,
    step_traffic_bytes,
    time_interleaved,
    timed_first_steps,
)

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


def _heavyball_adamw(params):
    try:
        hb = importlib.import_module("heavyball")
    except ImportError:
        return None
    return RestoreGrads(hb.AdamW(params, lr=1e-3), params)


def _feed_hessian(opt, name):
    info = lit_optim.get_optimizer_info(name)
    if info.curvature is not None and hasattr(opt, "update_hessian"):
        # one estimate per parameter, in the optimizer's own order (its groups reorder them)
        opt.update_hessian([p.grad.abs() for g in opt.param_groups for p in g["params"]])


def _gbs(nbytes, t):
    return nbytes / t / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (default: all registered but the "
                    "orthogonalized and memory-reduced families, which have their own benchmarks)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512, help="model width d (default 512: ~29.5M parameters)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-peers", action="store_true", help="leave out pytorch_optimizer and heavyball")
    ap.add_argument("--fused", default="both", choices=["both", "off", "only"],
                    help="time the multi-tensor path, the compiled path (fused=True) or both (default)")
    ap.add_argument("--nonfinite", default="raise", choices=["raise", "ignore"],
                    help="lit_optim's non-finite-gradient check: on (raise, the default) or off (ignore)")
    ap.add_argument("--markdown", default="", help="also append the table, in Markdown, to this file")
    args = ap.parse_args(argv)
    malloc = steady_malloc()
    dtype = getattr(torch, args.dtype)
    dev = args.device
    shapes = gpt_shapes(d=args.width, layers=args.layers)
    names = [n for n in args.only.split(",") if n] or _default_names()
    head = (f"{numel(shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.dtype}, {device_name(dev)}, "
            f"torch {torch.__version__}, steady malloc: {malloc}, median of {args.reps} interleaved steps, "
            f"lit_optim nonfinite={args.nonfinite}")
    print("# " + head)

    def fresh():
        return make_params(shapes, dtype=dtype, device=dev)

    base_ps = fresh()
    base = torch.optim.AdamW(base_ps, lr=1e-3, foreach=True)
    fused_ps = fresh()
    fused_adamw = None
    try:
        fused_adamw = torch.optim.AdamW(fused_ps, lr=1e-3, fused=True)
        fused_adamw.step()
    except (RuntimeError, TypeError) as e:  # fused not available for this device/dtype
        print(f"torch AdamW(fused) unavailable: {e}")
        fused_adamw = None
    refs = {"adamw(foreach)": base.step}
    if fused_adamw is not None:
        refs["adamw(fused)"] = fused_adamw.step
    hb_ps = hb = None
    hb_compile = float("nan")
    if not args.no_peers:
        hb_ps = fresh()
        try:
            hb = _heavyball_adamw(hb_ps)
            if hb is not None:
                hb_compile = timed_first_steps(hb.step, 2, dev)
                refs["heavyball"] = hb.step
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"heavyball AdamW failed: {e}")
            hb = None
    t = time_interleaved(refs, reps=args.reps, device=dev)
    t_base = t["adamw(foreach)"]
    t_fused = t.get("adamw(fused)")
    bw_fused = _gbs(step_traffic_bytes(fused_ps, fused_adamw), t_fused) if t_fused else None

    t_hb = t.get("heavyball")
    header = ["optimizer", "path", "ms/step", "/AdamW", "/fusedAdamW", "/heavyball", "GB/s", "BW/fused",
              "compile s", "pytorch_optimizer ms", "po /AdamW"]
    rows: list[list[str]] = []
    md = None
    if args.markdown:
        md = open(args.markdown, "a")  # noqa: SIM115 - rows are appended as they are measured
        md.write(f"\n### Elementwise optimizers: step time\n\n{head}\n\n")
        md.write(markdown_table(header, []))
        md.flush()

    def row(label, path, ms, nbytes=None, compile_s=None, peer_ms=None):
        r = [label, path, f"{ms * 1e3:.1f}", f"{ms / t_base:.2f}", f"{ms / t_fused:.2f}" if t_fused else "-",
             f"{ms / t_hb:.2f}" if t_hb else "-"]
        if nbytes:
            bw = _gbs(nbytes, ms)
            r += [f"{bw:.1f}", f"{bw / bw_fused:.2f}" if bw_fused else "-"]
        else:
            r += ["-", "-"]
        r.append(f"{compile_s:.1f}" if compile_s is not None and not math.isnan(compile_s) else "-")
        r += [f"{peer_ms * 1e3:.1f}", f"{peer_ms / t_base:.2f}"] if peer_ms else ["-", "-"]
        rows.append(r)
        print("  ".join(f"{c:>{w}}" for c, w in zip(r, widths)), flush=True)
        if md is not None:
            md.write("| " + " | ".join(r) + " |\n")
            md.flush()

    widths = [12, 15, 8, 7, 11, 10, 6, 8, 9, 20, 9]
    print("  ".join(f"{c:>{w}}" for c, w in zip(header, widths)))
    row("torch AdamW", "foreach", t_base, step_traffic_bytes(base_ps, base))
    if t_fused:
        row("torch AdamW", "fused", t_fused, step_traffic_bytes(fused_ps, fused_adamw))
    if hb is not None:
        # the same bytes as torch's AdamW (heavyball keeps its state in its own layout)
        row("heavyball", "AdamW compiled", t["heavyball"], step_traffic_bytes(base_ps, base), hb_compile)
    del hb, hb_ps

    for name in names:
        steps = {"adamw(foreach)": base.step}
        if fused_adamw is not None:
            steps["adamw(fused)"] = fused_adamw.step
        built = {}
        compile_s = None
        for fused in ((False, True) if args.fused == "both" else (args.fused == "only",)):
            ps = fresh()
            try:
                opt = lit_optim.create_optimizer(ps, name, fused=fused, nonfinite=args.nonfinite)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name:<28} could not be built on plain tensors: {e}")
                break
            _feed_hessian(opt, name)
            if fused:
                if not getattr(opt, "elementwise", False):
                    continue  # no compiled update: the flag runs the multi-tensor path
                before = _compiled.compile_report().get(type(opt).__name__, {}).get("compile_s", 0.0)
                timed_first_steps(opt.step, 2, dev)
                compile_s = _compiled.compile_report().get(type(opt).__name__, {}).get("compile_s", 0.0) - before
            key = "fused" if fused else "foreach"
            built[key] = (opt, ps)
            steps[key] = opt.step
        if not built:
            continue
        peer = None
        if not args.no_peers:
            pps = fresh()
            try:
                peer = _peer(name, pps)
            except Exception as e:  # noqa: BLE001
                print(f"  (peer for {name} failed: {e})")
            if peer is not None:
                steps["peer"] = peer.step
        t = time_interleaved(steps, reps=args.reps, device=dev)
        # the references of this row's group (heavyball keeps the figure of its own group)
        t_base = t["adamw(foreach)"]
        if "adamw(fused)" in t:
            t_fused = t["adamw(fused)"]
        first = True
        for key in ("foreach", "fused"):
            if key not in built:
                continue
            opt, ps = built[key]
            row(name if first else "", key, t[key], step_traffic_bytes(ps, opt),
                compile_s if key == "fused" else None, t.get("peer") if first else None)
            first = False
        del built, peer, steps
    report = _compiled.compile_report()
    fallbacks = {k: v["fallback"] for k, v in report.items() if "fallback" in v}
    if fallbacks:
        print(f"# compiled path fell back to the multi-tensor path: {fallbacks}")
    if md is not None:
        if fallbacks:
            md.write(f"\ncompiled path fell back to the multi-tensor path: {fallbacks}\n")
        md.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
