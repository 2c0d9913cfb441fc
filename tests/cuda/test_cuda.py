"""CUDA correctness: skipped on machines without a GPU; run by ``scripts/gpu_check.sh``.

* the shared optimizer table on CUDA: multi-tensor (foreach), per-tensor loop and fused
  (``fused=True``, compiled) updates agree, and the loss goes down;
* the fused path does not recompile over a cosine schedule on CUDA;
* Newton-Schulz: the compiled iteration matches the eager one;
* Lightning training on the GPU under bf16 autocast with each callback;
* HessianDiagCallback and the curvature estimators on CUDA (generators on the device);
* ``lit-optim compare --device cuda`` end to end on the tiny digits task.

``LIT_OPTIM_TEST_DEVICE=cpu`` runs the same tests on the CPU (``scripts/gpu_check.sh --dry-run``
does, so that the script and these tests are exercised on machines without a GPU).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

import lit_optim
from lit_optim.optim import LitOptimizer, _compiled

from ..optim.table import all_specs

DEV = os.environ.get("LIT_OPTIM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
SPECS = [s for s in all_specs() if isinstance(s.cls, type) and issubclass(s.cls, LitOptimizer)]
ELEMENTWISE = [s for s in SPECS if s.cls.elementwise]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (3, 2, 2), (6, 3), (0, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEV))
            for s in shapes]


def grad_seq(params, n, seed=1, none_at=()):
    g = torch.Generator().manual_seed(seed)
    return [[None if (t, i) in none_at else torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
             for i, p in enumerate(params)] for t in range(n)]


def run(spec, opt, params, seq, base_lr=None):
    for t, gs in enumerate(seq):
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        if base_lr is not None:
            for group in opt.param_groups:
                group["lr"] = base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t / len(seq))))
        spec.do_step(opt, params)


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ----------------------------------------------------------------------------- the table on CUDA


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_foreach_loop_and_fused_agree_on_cuda(spec):
    params = make_params()
    seq = grad_seq(params, 3, none_at={(1, 0)})
    out = []
    for kw in ({"foreach": True}, {"foreach": False}, {"fused": True}):
        ps = clone(params)
        opt = spec.cls(ps, **{**spec.inputs[0], **kw})
        run(spec, opt, ps, seq, base_lr=spec.inputs[0].get("lr", 1e-2))
        out.append(ps)
    for variant in out[1:]:
        for a, b in zip(out[0], variant):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_loss_goes_down_on_cuda(spec):
    torch.manual_seed(0)
    X = torch.randn(64, 6, device=DEV)
    Y = X @ torch.randn(5, 6, device=DEV).t()
    W = torch.nn.Parameter(torch.zeros(5, 6, device=DEV))
    b = torch.nn.Parameter(torch.zeros(5, device=DEV))
    opt = spec.cls([W, b], **{**spec.inputs[0], "lr": spec.lr})

    def closure():
        opt.zero_grad()
        loss = ((X @ W.t() + b - Y) ** 2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        initial = ((X @ W.t() + b - Y) ** 2).mean().item()
    for _ in range(spec.steps):
        if spec.needs_closure:
            spec.do_step(opt, [W, b], closure)
        else:
            closure()
            spec.do_step(opt, [W, b])
    with torch.no_grad():
        final = ((X @ W.t() + b - Y) ** 2).mean().item()
    assert final < 0.5 * initial


@pytest.mark.parametrize("spec", ELEMENTWISE, ids=[s.name for s in ELEMENTWISE])
def test_fused_does_not_recompile_over_a_cosine_schedule_on_cuda(spec):
    if spec.cls.__name__ == "EXAdam":
        pytest.xfail("exadam.py uses math.log(step): one graph per step")
    params = make_params()
    opt = spec.cls(params, **{**spec.inputs[0], "fused": True})
    seq = grad_seq(params, 40)
    run(spec, opt, params, seq[:2], base_lr=1e-3)
    warm = _compiled.compile_report()[spec.cls.__name__]["graphs"]
    run(spec, opt, params, seq[2:], base_lr=1e-3)
    assert _compiled.compile_report()[spec.cls.__name__]["graphs"] == warm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_and_fp32_params_fused_on_cuda(dtype):
    spec = next(s for s in ELEMENTWISE if s.cls is lit_optim.AdaBelief)
    params = make_params(dtype)
    seq = grad_seq(params, 3)
    out = []
    for fused in (False, True):
        ps = clone(params)
        run(spec, spec.cls(ps, weight_decay=0.01, fused=fused), ps, seq, base_lr=1e-2)
        out.append(ps)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in zip(*out):
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_compiled_newton_schulz_matches_eager_on_cuda():
    ns = importlib.import_module("lit_optim.functional.newton_schulz")
    x = torch.randn(4, 64, 32, device=DEV)
    eager = ns.orthogonalize([x], dtype=torch.bfloat16)[0].float()
    with _compiled.compiled_newton_schulz(DEV, force=True):
        assert ns._iterate_owned is not ns._eager_iterate_owned
        comp = ns.orthogonalize([x], dtype=torch.bfloat16)[0].float()
    torch.testing.assert_close(comp, eager, atol=3e-2, rtol=3e-2)
    s = torch.linalg.svdvals(comp)
    assert float(s.max()) < 1.3 and float(s.min()) > 0.5


# ----------------------------------------------------------------------------- Lightning on the GPU


def _trainer(**kw):
    import lightning as L

    base = {"accelerator": "gpu" if DEV == "cuda" else "cpu", "devices": 1, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "max_epochs": 2}
    base.update(kw)
    return L.Trainer(**base)


def _callbacks():
    from torch.utils.data import DataLoader, TensorDataset

    from lit_optim.callbacks import (
        AdaptiveBatchSizeCallback,
        GradClipMedianCallback,
        HessianDiagCallback,
        StabilityGapEvaluator,
        WeightAveragingCallback,
    )

    def loaders():
        g = torch.Generator().manual_seed(0)
        return [DataLoader(TensorDataset(torch.randn(20, 8, generator=g), torch.randint(0, 4, (20,), generator=g)),
                           batch_size=10) for _ in range(2)]

    return {
        "weight_averaging": ("adamw", lambda: WeightAveragingCallback("ema", decays=[0.9, 0.99])),
        "grad_clip_median": ("adamw", lambda: GradClipMedianCallback(window=8, min_history=2)),
        "adaptive_batch_size": ("adamw", lambda: AdaptiveBatchSizeCallback(max_batch_size=32)),
        "hessian_diag_hutchinson": ("sophia", lambda: HessianDiagCallback("hutchinson", every_n_steps=2)),
        "hessian_diag_gnb": ("sophia", lambda: HessianDiagCallback("gnb", every_n_steps=2)),
        "stability_gap": ("adamw", lambda: StabilityGapEvaluator(loaders(), every_n_steps=2, verbose=False)),
    }


@pytest.mark.parametrize("name", list(_callbacks()))
def test_bf16_autocast_training_with_each_callback(name):
    from ..helpers import TinyClassifier, flat_params

    optimizer, make = _callbacks()[name]
    torch.manual_seed(0)
    module = TinyClassifier(optimizer=optimizer)
    before = flat_params(module)
    _trainer(precision="bf16-mixed", callbacks=[make()]).fit(module)
    after = flat_params(module)
    assert next(module.parameters()).device.type == DEV
    assert torch.isfinite(after).all() and not torch.equal(before.cpu(), after.cpu())


@pytest.mark.parametrize("optimizer", ["sophia", "adahessian"])
@pytest.mark.parametrize("fused", [False, True])
def test_hessian_diag_callback_trains_gpt_on_cuda(optimizer, fused):
    from lit_optim.callbacks import HessianDiagCallback

    from ..curvature.tiny_gpt import GPTModule

    torch.manual_seed(0)
    module = GPTModule(optimizer=optimizer, opt_kwargs={"fused": fused})
    # fused SDPA kernels have no double backward: the callback switches to the math kernel while estimating
    cb = HessianDiagCallback("hutchinson", every_n_steps=2, math_attention=True)
    _trainer(max_epochs=2, callbacks=[cb]).fit(module)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert next(module.parameters()).device.type == DEV


def test_curvature_estimators_on_cuda():
    from lit_optim.curvature import gnb_diagonal, hutchinson_diagonal
    from lit_optim.functional.hutchinson import make_generator

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3).to(DEV)
    x = torch.randn(16, 6, device=DEV)
    y = torch.randint(0, 3, (16,), device=DEV)
    params = list(lin.parameters())
    loss = torch.nn.functional.cross_entropy(lin(x), y)
    h1 = hutchinson_diagonal(loss, params, n_probes=2, generator=make_generator(3, DEV))
    loss = torch.nn.functional.cross_entropy(lin(x), y)
    h2 = hutchinson_diagonal(loss, params, n_probes=2, generator=make_generator(3, DEV))
    for a, b in zip(h1, h2):
        assert a.device.type == DEV and torch.equal(a, b)  # same seed, same device generator: same probes
    g = gnb_diagonal(lin(x), params, n_samples=2, generator=make_generator(4, DEV))
    assert all(t.device.type == DEV and bool((t >= 0).all()) for t in g)


def test_lit_optim_compare_on_cuda(tmp_path, capsys):
    from lit_optim.cli import main

    args = ["compare", "--task", "digits", "--model-size", "tiny", "--batch-size", "16", "--steps", "8", "--seeds", "1",
            "--tune", "none", "--jobs", "1", "--timing-reps", "2", "--timing-steps", "1", "--device", DEV,
            "--optimizers", "adamw,lion,adan", "--out", str(tmp_path), "--name", "gpu"]
    assert main(args) == 0
    report = (tmp_path / "gpu" / "report.md").read_text()
    assert "| lion |" in report and "| adan |" in report
