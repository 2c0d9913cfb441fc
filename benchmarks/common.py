"""Shared pieces of the benchmarks: GPT-like parameter shapes and interleaved step timing."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def steady_malloc() -> bool:
    """Make glibc keep freed memory instead of returning it to the kernel (no trimming, 512 MiB top
    pad, fixed 32 MiB mmap threshold). Without it, whether a step's large temporaries (torch
    AdamW(foreach) allocates one per parameter) come back as fresh pages, and pay page faults,
    depends on what ran before: AdamW(foreach) measured anywhere from 37 to 71 ms in successive
    rows of one run. Same as ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` /
    ``MALLOC_MMAP_THRESHOLD_``; ``LIT_OPTIM_BENCH_DEFAULT_MALLOC=1`` turns it off. Returns
    whether it was applied (glibc Linux only)."""
    if not sys.platform.startswith("linux") or os.environ.get("LIT_OPTIM_BENCH_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1)
    ok &= libc.mallopt(m_top_pad, 512 << 20)
    ok &= libc.mallopt(m_mmap_threshold, 32 << 20)
    return bool(ok)


def gpt_shapes(vocab: int = 8192, d: int = 512, layers: int = 8, mlp: int = 4) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (tied embedding/head): ~29.5M parameters with the
    defaults. Embedding, positional embedding, and per layer: 2 LayerNorms (weight, bias), fused QKV
    (weight, bias), attention projection, MLP up and down (weights, biases); final LayerNorm."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes, seed: int = 0, dtype=torch.float32, device="cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype=dtype, device=device))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype=dtype, device=device)
        ps.append(p)
    return ps


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable[[], None]], reps: int = 10, warmup: int = 2, device="cpu"
) -> dict[str, float]:
    """Median seconds per call of each step function, calling them in turn (A, B, C, A, B, C, ...)
    so that machine noise hits all of them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def numel(shapes) -> int:
    n = 0
    for s in shapes:
        k = 1
        for x in s:
            k *= x
        n += k
    return n


def device_name(device) -> str:
    """A human-readable name of the machine the benchmark ran on."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def step_traffic_bytes(params, optimizer) -> int:
    """Bytes an elementwise optimizer step must move at least: every parameter read and written,
    every gradient read, every state tensor of more than one element read and written (scalars
    such as step counters are left out). Dividing by the step time gives the achieved bandwidth."""
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    s_bytes = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                s_bytes += v.numel() * v.element_size()
    return 2 * p_bytes + g_bytes + 2 * s_bytes


class RestoreGrads:
    """heavyball consumes ``.grad`` in its step (sets it to None); put the fixed gradients back
    before every step so that each timed step does the full work."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params
        self.grads = [p.grad for p in params]
        self.state = getattr(opt, "state", {})

    def step(self):
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt.step()


def timed_first_steps(step: Callable[[], None], n: int = 2, device="cpu") -> float:
    """Wall seconds of the first ``n`` calls (compilation included, for compiled steps)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return time.perf_counter() - t0


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
