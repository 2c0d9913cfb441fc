"""Memory benchmark of the memory-reduced optimizers (FRUGAL, SubsetNormAdam, DCTLowRank) against
torch.optim.AdamW and, when pytorch_optimizer is installed, its GaLore (SVD projection) and AdamWSN
(subset-norm) at the same rank.

    .venv/bin/python -m benchmarks.memory                       # everything (~8 min on 2 idle cores)
    .venv/bin/python -m benchmarks.memory --sections state      # state bytes + step time only
    .venv/bin/python -m benchmarks.memory --sections convergence --only "frugal,frugal(svd)" --steps 300

Labels: ``frugal``, ``frugal(svd)``, ``frugal(blockwise)``, ``subset_norm``, ``subset_norm(svd)``,
``dct_lowrank``, ``dct_lowrank(T=200)``, ``dct_lowrank(bf16)``, ``frugal(svd/bf16)``,
``subset_norm(svd/bf16)`` (projection products in bfloat16, ``proj_dtype``), any label with
``(T=N)`` appended; ``<name>+emb`` keeps the embeddings and head on the full-state AdamW (the papers'
split); ``galore[pytorch_optimizer]``, ``adamwsn[pytorch_optimizer]``.

Sections:

* ``state``: optimizer-state bytes per parameter, counted from ``optimizer.state`` with
  :func:`lit_optim.optim.optimizer_state_bytes` (GaLore keeps its projection matrices in a Python
  object, which is added by hand; the DCT basis, shared by all layers of a size, is listed apart),
  and the time of ``optimizer.step()`` as a ratio to ``AdamW(foreach=True)``, all optimizers timed
  interleaved in one process on the parameter shapes of a ~29.5M-parameter GPT
  (:func:`benchmarks.common.gpt_shapes`: vocab 8192 x 512, 8 layers, tied head) with fixed random
  gradients. Rank 128 = d/4 for every matrix. "steady" is a step without subspace refresh; "refresh"
  is a step that recomputes every subspace (timed on a copy with ``update_proj_gap=1``);
  "amortized" = steady + (refresh - steady) / T with each optimizer's default gap T (200 for
  FRUGAL, SubsetNormAdam and GaLore, 10 for DCTLowRank), and with T = 200 for all.
* ``peak``: peak resident memory (``VmHWM``, or ``ru_maxrss`` off Linux) of a process that trains that GPT (``TinyGPT``,
  built from a config) for 3 steps on a 1 x 64-token batch (small, so that activations do not hide
  the optimizer), one fresh subprocess per optimizer; "added" is the peak minus the resident memory
  of the same process after a forward/backward without an optimizer: the states plus the step's
  temporaries. ``tracemalloc`` cannot see torch's allocations, hence a process-level figure.
* ``convergence``: the comparison task of ``lit-optim compare`` (a character-level TinyGPT on the
  Python standard library's source, cosine schedule, same seed and data order), the same number
  of steps for every optimizer, at each optimizer's default learning rate (``--lrs default``) or
  over a sweep (``--lrs 1e-3,2e-3,3e-3``, which also compares best with best); the final training
  loss (mean of the last 10% of steps) and validation loss as a ratio to AdamW's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

import lit_optim
from lit_optim.optim import lowrank_groups, optimizer_state_bytes

from .common import gpt_shapes, numel, steady_malloc, time_interleaved

RANK = 128  # d/4 for d = 512
GAP = 200

# label -> (registry name, constructor kwargs); a label ending in "+emb" keeps the papers' split:
# embeddings and output head with the full-state AdamW (lowrank_groups(..., project_embeddings=False))
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "frugal": ("frugal", {}),
    "frugal(svd)": ("frugal", {"projection": "svd"}),
    "frugal(blockwise)": ("frugal", {"projection": "blockwise"}),
    "frugal+emb": ("frugal", {}),
    "subset_norm": ("subset_norm", {}),
    "subset_norm(svd)": ("subset_norm", {"projection": "svd"}),
    "subset_norm+emb": ("subset_norm", {}),
    "dct_lowrank": ("dct_lowrank", {}),
    "dct_lowrank(T=200)": ("dct_lowrank", {"update_proj_gap": 200}),
    "dct_lowrank(bf16)": ("dct_lowrank", {"proj_dtype": "bfloat16"}),
    "frugal(svd/bf16)": ("frugal", {"projection": "svd", "proj_dtype": "bfloat16"}),
    "subset_norm(svd/bf16)": ("subset_norm", {"projection": "svd", "proj_dtype": "bfloat16"}),
    "dct_lowrank+emb": ("dct_lowrank", {}),
}


def _ours(label: str) -> tuple[str, dict[str, Any]] | None:
    """Registry name and kwargs of one of our labels; ``<label>(T=N)`` sets ``update_proj_gap=N``."""
    if label in OURS:
        return OURS[label]
    m = re.fullmatch(r"(.+)\(T=(\d+)\)", label)
    if m and m.group(1) in OURS:
        name, kw = OURS[m.group(1)]
        return name, {**kw, "update_proj_gap": int(m.group(2))}
    return None


PEERS = ("galore[pytorch_optimizer]", "adamwsn[pytorch_optimizer]")
SECTIONS = ("state", "peak", "convergence")
#: optimizers of each section when --only is not given (AdamW always runs first as the baseline)
DEFAULTS = {
    "state": [*OURS, *PEERS],
    "peak": ["frugal", "frugal(blockwise)", "subset_norm", "dct_lowrank", "frugal+emb", *PEERS],
    "convergence": ["frugal", "subset_norm", "dct_lowrank"],
}


def _pytorch_optimizer():
    try:
        import pytorch_optimizer

        return pytorch_optimizer
    except ImportError:
        return None


def _groups(params, embeddings: set[int] | None, project_embeddings: bool):
    if project_embeddings or not embeddings:
        return lowrank_groups(params)
    return [
        {"params": [p for p in params if p.ndim >= 2 and id(p) not in embeddings], "project": True},
        {"params": [p for p in params if id(p) in embeddings], "project": False},
        {"params": [p for p in params if p.ndim < 2], "project": False},
    ]


def build(
    label: str,
    params: list[torch.Tensor],
    gap: int | None = None,
    lr: float | None = None,
    embeddings: set[int] | None = None,
) -> torch.optim.Optimizer | None:
    """The optimizer ``label`` over ``params`` (matrices projected/subset-normed at rank 128, vectors
    with a plain Adam update, as each method's factory or README suggests). ``embeddings``: ids of
    the embedding/head matrices, kept full-state by the "+emb" labels. ``gap`` and ``lr`` default
    to each optimizer's own defaults (GaLore: gap 200)."""
    mats = [p for p in params if p.ndim >= 2]
    vecs = [p for p in params if p.ndim < 2]
    if label == "adamw":
        return torch.optim.AdamW(params, lr=lr or 1e-3, foreach=True)
    if _ours(label) is not None:
        name, kw = _ours(label)
        kw = dict(kw)
        if gap is not None:
            kw["update_proj_gap"] = gap
        if kw.get("projection") != "blockwise":
            kw["rank"] = RANK
        groups = _groups(params, embeddings, project_embeddings=not label.endswith("+emb"))
        return lit_optim.create_optimizer(groups, name, lr=lr, **kw)
    po = _pytorch_optimizer()
    if po is None:
        return None
    if label == "galore[pytorch_optimizer]":
        groups = [
            {"params": mats, "rank": RANK, "update_proj_gap": gap or GAP, "scale": 1.0, "projection_type": "std"},
            {"params": vecs},
        ]
        return po.GaLore(groups, lr=lr or 1e-3)
    if label == "adamwsn[pytorch_optimizer]":
        return po.AdamWSN([{"params": mats, "sn": True}, {"params": vecs, "sn": False}], lr=lr or 1e-3)
    raise ValueError(f"unknown optimizer label {label!r}")


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes in optimizer.state tensors incl. GaLore's projectors, bytes of shared bases)."""
    n = optimizer_state_bytes(opt)
    for st in opt.state.values():
        proj = st.get("projector") if isinstance(st, dict) else None
        mat = getattr(proj, "ortho_matrix", None)
        if isinstance(mat, torch.Tensor):
            n += mat.numel() * mat.element_size()
        elif isinstance(mat, tuple):
            n += sum(t.numel() * t.element_size() for t in mat)
    shared = opt.basis_bytes() if hasattr(opt, "basis_bytes") else 0
    return n, shared


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        ps.append(p)
    return ps


def section_state(labels: list[str], reps: int) -> list[dict[str, Any]]:
    steady_malloc()  # step timing only: the peak-memory section runs in fresh processes
    shapes = gpt_shapes()
    n = numel(shapes)
    print(f"# state/step time: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, rank {RANK}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {_load()}", flush=True)
    # one set of parameters and gradients shared by all optimizers (each keeps its own state)
    params = _params(shapes)
    emb = {id(p) for p in params if p.ndim == 2 and p.shape[0] in (8192, 1024)}
    opts: dict[str, torch.optim.Optimizer] = {}
    for label in ["adamw", *labels]:
        opt = build(label, params, embeddings=emb)
        if opt is None:
            print(f"  {label}: skipped (pytorch_optimizer not installed)")
            continue
        opts[label] = opt
    steady = time_interleaved({k: o.step for k, o in opts.items()}, reps=reps, warmup=2)
    # refresh cost: the same optimizers with update_proj_gap=1 (every step recomputes the subspaces)
    refresh_opts = {}
    for label in opts:
        if label in ("adamw", "adamwsn[pytorch_optimizer]", "frugal(blockwise)") or label.endswith("+emb"):
            continue
        refresh_opts[label] = build(label, params, gap=1, embeddings=emb)
    refresh = (
        time_interleaved({k: o.step for k, o in refresh_opts.items()}, reps=max(3, reps // 2), warmup=1)
        if refresh_opts
        else {}
    )
    adam_bytes = state_bytes(opts["adamw"])[0]
    rows = []
    for label, opt in opts.items():
        b, shared = state_bytes(opt)
        st = steady[label]
        rf = refresh.get(label)
        no_refresh = label in ("adamw", "adamwsn[pytorch_optimizer]", "frugal(blockwise)")
        gap = opt.param_groups[0].get("update_proj_gap")
        amort = st + (rf - st) / gap if rf is not None else (st if no_refresh else None)
        amort200 = st + (rf - st) / GAP if rf is not None else (st if no_refresh else None)
        rows.append(
            dict(
                optimizer=label,
                state_MB=b / 2**20,
                bytes_per_param=b / n,
                pct_of_adamw=100.0 * b / adam_bytes,
                shared_basis_MB=shared / 2**20,
                step_ms=st * 1e3,
                step_ratio=st / steady["adamw"],
                refresh_ms=None if rf is None else rf * 1e3,
                gap=gap,
                amortized_ratio=None if amort is None else amort / steady["adamw"],
                amortized_ratio_T200=None if amort200 is None else amort200 / steady["adamw"],
            )
        )
    print("| optimizer | state MB | bytes/param | % of AdamW | steady step | x AdamW | refresh step | T | "
          "amortized x AdamW | amortized at T=200 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (+{r['shared_basis_MB']:.1f} MB shared DCT basis)" if r["shared_basis_MB"] else ""
        rf = "-" if r["refresh_ms"] is None else f"{r['refresh_ms']:.0f} ms"
        am = "-" if r["amortized_ratio"] is None else f"{r['amortized_ratio']:.2f}"
        am2 = "-" if r["amortized_ratio_T200"] is None else f"{r['amortized_ratio_T200']:.2f}"
        print(f"| {r['optimizer']} | {r['state_MB']:.1f}{extra} | {r['bytes_per_param']:.2f} | {r['pct_of_adamw']:.1f}% | "
              f"{r['step_ms']:.0f} ms | {r['step_ratio']:.2f} | {rf} | {r['gap'] or '-'} | {am} | {am2} |", flush=True)
    return rows


# ----------------------------------------------------------------------------- peak RSS


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


def _peak_kib() -> int:
    """Peak resident set size of this process in KiB: ``VmHWM`` of /proc/self/status on Linux (the
    high-water mark of this process's own memory; ``ru_maxrss`` would also count the parent's
    resident memory at fork time), ``ru_maxrss`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # ru_maxrss: KiB on Linux, bytes on macOS


def _peak_child(label: str, steps: int, batch: int, seqlen: int) -> dict[str, Any]:
    from lit_optim.tasks import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=8192, block_size=1024, n_layer=8, n_head=8, n_embd=512))
    x = torch.randint(0, 8192, (batch, seqlen))
    y = torch.randint(0, 8192, (batch, seqlen))

    def fwd_bwd():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    fwd_bwd()
    base = _rss_kib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build(label, params, embeddings={id(model.tok.weight), id(model.pos.weight)})
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=False)
        fwd_bwd()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = _peak_kib()
    return dict(
        optimizer=label,
        params=sum(p.numel() for p in params),
        peak_MB=peak / 1024,
        base_MB=base / 1024,
        added_MB=(peak - base) / 1024,
        state_MB=state_bytes(opt)[0] / 2**20,
        train_step_s=min(times[1:]) if len(times) > 1 else times[0],
    )


def section_peak(labels: list[str], steps: int = 3, batch: int = 1, seqlen: int = 64) -> list[dict[str, Any]]:
    print(f"# peak RSS: TinyGPT 8x512, vocab 8192, batch {batch}x{seqlen}, {steps} steps, one process per optimizer",
          flush=True)
    rows = []
    for label in ["adamw", *labels]:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--_peak", label, "--_peak-steps", str(steps),
               "--_peak-batch", str(batch), "--_peak-seqlen", str(seqlen)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
        if out.returncode != 0:
            print(f"  {label}: failed\n{out.stderr[-2000:]}")
            continue
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not line:
            print(f"  {label}: skipped")
            continue
        rows.append(json.loads(line[-1]))
    if not rows:
        return rows
    base = next((r for r in rows if r["optimizer"] == "adamw"), rows[0])
    print("| optimizer | peak RSS MB | added by optimizer MB | state MB | train step s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['peak_MB']:.0f} ({r['peak_MB'] - base['peak_MB']:+.0f}) | {r['added_MB']:.0f} | "
              f"{r['state_MB']:.1f} | {r['train_step_s']:.2f} |", flush=True)
    return rows


# ----------------------------------------------------------------------------- convergence


def section_convergence(
    labels: list[str], steps: int, batch_size: int, seed: int, lrs: list[float | None]
) -> list[dict[str, Any]]:
    from lit_optim.compare import run_one
    from lit_optim.registry import get_optimizer_info

    lr_text = ", ".join("default" if lr is None else f"{lr:g}" for lr in lrs)
    print(f"# convergence: charlm (TinyGPT small on Python stdlib source), {steps} steps, batch {batch_size}, "
          f"seed {seed}, cosine schedule, lr: {lr_text}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for label in ["adamw", *labels]:
            if label.endswith("+emb") or (_ours(label) is None and label != "adamw"):
                continue  # the comparison task builds its groups through the registry
            name, kw = _ours(label) or ("adamw", {})
            for lr in lrs:
                lr_used = get_optimizer_info(name).default_lr if lr is None else lr
                t0 = time.perf_counter()
                r = run_one(name, steps=steps, batch_size=batch_size, seed=seed, out=out, progress_bar=False,
                            optimizer_kwargs=kw, lr=lr_used)
                if r.error:
                    print(f"  {label} lr={lr_used:g}: {r.error}")
                    continue
                rows.append(dict(optimizer=label, lr=lr_used, train_loss=r.final_train_loss, val_loss=r.final_val_loss,
                                 bytes_per_param=r.bytes_per_param, wall_s=time.perf_counter() - t0))
                print(f"  {label} lr={lr_used:g}: train {r.final_train_loss:.4f} val {r.final_val_loss:.4f}", flush=True)
    if not rows:
        return rows
    base = {lr: r for r in rows if r["optimizer"] == "adamw" for lr in [r["lr"]]}
    best_adamw = min((r for r in rows if r["optimizer"] == "adamw"), key=lambda r: r["val_loss"])
    first_adamw = next(r for r in rows if r["optimizer"] == "adamw")
    print("| optimizer | lr | final train loss | x AdamW | val loss | x AdamW | state bytes/param |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get(r["lr"], first_adamw)
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['train_loss']:.4f} | {r['train_loss'] / ref['train_loss']:.3f} | "
              f"{r['val_loss']:.4f} | {r['val_loss'] / ref['val_loss']:.3f} | {r['bytes_per_param']:.2f} |", flush=True)
    if len(lrs) > 1:
        print(f"best AdamW: lr {best_adamw['lr']:g}, val {best_adamw['val_loss']:.4f}")
        print("| optimizer | best lr | val loss | x best AdamW |")
        print("|---|---|---|---|")
        for label in dict.fromkeys(r["optimizer"] for r in rows):
            b = min((r for r in rows if r["optimizer"] == label), key=lambda r: r["val_loss"])
            print(f"| {label} | {b['lr']:g} | {b['val_loss']:.4f} | {b['val_loss'] / best_adamw['val_loss']:.3f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--only", default="", help="comma-separated optimizer labels (default: all)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions of the step timing")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the convergence comparison")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lrs", default="default",
                    help="comma-separated learning rates of the convergence runs; 'default' = each optimizer's own")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--json", default="", help="write all rows to this file")
    ap.add_argument("--_peak", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_peak-steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--_peak-batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_peak-seqlen", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._peak:
        params_ok = (args._peak == "adamw" or _ours(args._peak) is not None) or _pytorch_optimizer() is not None
        if params_ok:
            print(json.dumps(_peak_child(args._peak, args._peak_steps, args._peak_batch, args._peak_seqlen)))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {SECTIONS}")
    only = [s for s in args.only.split(",") if s]
    for label in only:
        if _ours(label) is None and label not in PEERS:
            ap.error(f"unknown optimizer label {label!r}; choose from {[*OURS, *PEERS]}")
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "state" in sections:
        results["state"] = section_state(only or DEFAULTS["state"], args.reps)
    if "peak" in sections:
        results["peak"] = section_peak(only or DEFAULTS["peak"])
    if "convergence" in sections:
        lrs = [None if x == "default" else float(x) for x in args.lrs.split(",") if x]
        results["convergence"] = section_convergence(
            only or DEFAULTS["convergence"], args.steps, args.batch_size, args.seed, lrs
        )
    print(f"# total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
