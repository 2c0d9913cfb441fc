"""Trainer-free maths of AdaptiveBatchSizeCallback: the tests of adaptive sampling against brute
force, the distributed reduction, the controller and per-example gradients."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from torch import nn

from lit_optim.functional.grad_stats import (
    BatchSizeController,
    GradSampleAccumulator,
    MicroBatchGradStats,
    coordinate_test,
    inner_product_test,
    lr_scale_factor,
    norm_test,
    per_example_grads,
    run_sampling_test,
)


def _samples(n=12, p=7, seed=0, signal=1.0):
    g = torch.Generator().manual_seed(seed)
    return (signal * torch.randn(p, generator=g) + torch.randn(n, p, generator=g)).double()


def _stats(G, unit_size=1, **kw):
    acc = GradSampleAccumulator(unit_size, track_inner=True, track_coordinate=True, **kw)
    acc.add(G)
    return acc.finalize()


def test_norm_test_matches_brute_force():
    G = _samples()
    st = _stats(G)
    mean = G.mean(0)
    var = torch.var(G, dim=0, correction=1).sum()
    eta = 0.3
    res = norm_test(st, eta)
    assert res.required_batch_size == pytest.approx(float(var / (eta**2 * mean.square().sum())), rel=1e-10)
    assert res.batch_size == 12
    assert res.statistic == pytest.approx(res.required_batch_size / 12)
    assert res.passed == (res.statistic <= 1)


def test_inner_product_and_orthogonality_match_brute_force():
    G = _samples(n=9, p=5, seed=1)
    st = _stats(G)
    mean = G.mean(0)
    sq = mean.square().sum()
    ip = G @ mean
    var_ip = torch.var(ip, correction=1)
    ortho = G - torch.outer(ip, mean) / sq
    var_orth = torch.var(ortho, dim=0, correction=1).sum()
    theta, nu = 0.5, 0.7
    plain = inner_product_test(st, theta)
    assert plain.required_batch_size == pytest.approx(float(var_ip / (theta**2 * sq**2)), rel=1e-9)
    aug = inner_product_test(st, theta, nu)
    expect = max(float(var_ip / (theta**2 * sq**2)), float(var_orth / (nu**2 * sq)))
    assert aug.required_batch_size == pytest.approx(expect, rel=1e-9)
    assert aug.details["variance_orthogonal"] == pytest.approx(float(var_orth), rel=1e-9)


def test_coordinate_test_matches_brute_force_and_is_stricter_than_norm_test():
    G = _samples(n=10, p=6, seed=2, signal=3.0)
    st = _stats(G)
    mean = G.mean(0)
    var = torch.var(G, dim=0, correction=1)
    eta = 0.2
    res = coordinate_test(st, eta)
    assert res.required_batch_size == pytest.approx(float((var / (eta**2 * mean.square())).max()), rel=1e-9)
    # summing the coordinate-wise conditions gives the norm test: the coordinate test asks for more
    assert res.required_batch_size >= norm_test(st, eta).required_batch_size
    ratios = (var / (eta**2 * mean.square())).sort().values
    q = coordinate_test(st, eta, quantile=0.5)
    assert q.required_batch_size == pytest.approx(float(ratios[math.ceil(0.5 * 6) - 1]), rel=1e-9)


def test_coordinate_test_zero_mean_and_zero_variance():
    G = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    st = _stats(G)
    # coordinate 0: mean 0, variance > 0 -> infinite; coordinate 1: no variance; coordinate 2: 0/0 -> 0
    assert coordinate_test(st, 0.1).required_batch_size == math.inf
    assert coordinate_test(st, 0.1, quantile=2 / 3).required_batch_size == 0.0


def test_unit_size_scales_micro_batch_variance_to_per_example_variance():
    # means of m i.i.d. examples have variance sigma^2/m: m * sample variance estimates sigma^2
    g = torch.Generator().manual_seed(3)
    m, n, p = 8, 4000, 3
    examples = torch.randn(n * m, p, generator=g).double() * 2.0 + 1.0  # per-coordinate var 4
    units = examples.view(n, m, p).mean(1)
    st = _stats(units, unit_size=m)
    assert st.variance_trace() == pytest.approx(3 * 4.0, rel=0.05)
    assert st.batch_size == n * m
    # the norm test of the units equals the norm test of the examples, in expectation
    ex = norm_test(_stats(examples[:4000]), 0.1).required_batch_size
    assert norm_test(st, 0.1).required_batch_size == pytest.approx(ex, rel=0.1)


def test_stacked_add_equals_one_by_one():
    G = _samples(n=6, p=4, seed=4)
    a = GradSampleAccumulator(2, track_inner=True, track_coordinate=True)
    for row in G:
        a.add(row)
    sa, sb = a.finalize(), _stats(G, unit_size=2)
    assert sa.count == sb.count == 6
    assert torch.allclose(sa.mean, sb.mean)
    assert sa.sum_sq_inner == pytest.approx(sb.sum_sq_inner)
    assert torch.allclose(sa.coord_sum_sq, sb.coord_sum_sq)


def _run_two_ranks(work):
    """Run ``work(rank, all_reduce)`` in two threads whose ``all_reduce`` sums the tensors the two
    pass in (in place, returning them): an in-process stand-in for two DDP ranks. Returns the two
    results."""
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    out: list = [None, None]

    def make_reduce(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            t.copy_(total)
            return t

        return reduce

    def run(rank):
        out[rank] = work(rank, make_reduce(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _two_rank_finalize(parts):
    """Finalize on two accumulators, one per in-process rank (see :func:`_run_two_ranks`)."""

    def work(rank, all_reduce):
        acc = GradSampleAccumulator(1, track_inner=True, track_coordinate=True)
        acc.add(parts[rank])
        return acc.finalize(all_reduce=all_reduce)

    return _run_two_ranks(work)


def test_all_reduced_statistics_equal_the_pooled_statistics_on_every_rank():
    G = _samples(n=10, p=5, seed=5)
    r0, r1 = _two_rank_finalize([G[:4], G[4:]])
    pooled = _stats(G)
    for st in (r0, r1):
        assert st.count == 10
        assert torch.allclose(st.mean, pooled.mean)
        for test in ("norm", "inner_product", "coordinate"):
            a = run_sampling_test(st, test, eta=0.2, theta=0.3, nu=0.4)
            b = run_sampling_test(pooled, test, eta=0.2, theta=0.3, nu=0.4)
            assert a.required_batch_size == pytest.approx(b.required_batch_size, rel=1e-9)
    assert (
        run_sampling_test(r0, "inner_product", theta=0.3).required_batch_size
        == run_sampling_test(r1, "inner_product", theta=0.3).required_batch_size
    )


def test_controller_grows_only_caps_and_scales_lr():
    ctl = BatchSizeController(16, 100, test="norm", eta=0.1, lr_scaling="sqrt")
    noisy = _stats(_samples(n=4, p=6, seed=6, signal=0.1), unit_size=4)
    res = ctl.observe(noisy)
    assert not res.passed
    want = min(100, math.ceil(res.required_batch_size))
    assert ctl.decide() == want
    f = ctl.grow_to(want)
    assert f == pytest.approx(math.sqrt(want / 16))
    assert ctl.lr_factor == pytest.approx(f)
    # a later test asking for less does not shrink the batch
    quiet = _stats(_samples(n=4, p=6, seed=7, signal=100.0), unit_size=4)
    assert ctl.observe(quiet).passed
    assert ctl.decide() == want
    with pytest.raises(ValueError, match="only grows"):
        ctl.grow_to(want - 1)
    # state round trip
    other = BatchSizeController(16, 100, test="norm", eta=0.1, lr_scaling="sqrt")
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()


def test_controller_ignores_non_finite_statistics():
    ctl = BatchSizeController(8, 64)
    G = _samples(n=4, p=3)
    G[1, 0] = float("inf")  # e.g. an fp16 overflow before the GradScaler skips the step
    assert ctl.observe(_stats(G)) is None
    assert ctl.decide() == 8


@pytest.mark.parametrize("rule,expect", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scale_factor(rule, expect):
    assert lr_scale_factor(rule, 16, 64) == pytest.approx(expect)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"test": "bogus"}, ValueError, "test must be one of"),
        ({"eta": 0.0}, ValueError, r"eta must be in \(0, inf\), got 0.0"),
        ({"theta": -1.0}, ValueError, "theta must be in"),
        ({"nu": float("nan")}, ValueError, "nu must be a number"),
        ({"lr_scaling": "cubic"}, ValueError, "lr_scaling must be one of"),
        ({"coordinate_quantile": 0.0}, ValueError, r"coordinate_quantile must be in \(0, 1\]"),
        ({"max_batch_size": 4}, ValueError, "max_batch_size must be >= the initial batch size 8"),
        ({"eta": "0.1"}, TypeError, "eta must be a real number"),
    ],
)
def test_controller_validation(kwargs, exc, match):
    args = {"batch_size": 8, "max_batch_size": 64}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        BatchSizeController(**args)


def test_norm_only_samples_with_known_total_match_full_samples():
    G = _samples(n=5, p=4, seed=8)
    acc = GradSampleAccumulator(3)
    for row in G:
        acc.add_sq_norm(float(row.square().sum()))
    with pytest.raises(ValueError, match=r"finalize\(total=\.\.\.\) is required"):
        acc.finalize()
    st = acc.finalize(total=G.sum(0))
    ref = _stats(G, unit_size=3)
    assert norm_test(st, 0.2).required_batch_size == pytest.approx(norm_test(ref, 0.2).required_batch_size)
    with pytest.raises(ValueError, match="need the samples themselves"):
        GradSampleAccumulator(1, track_inner=True).add_sq_norm(1.0)


def test_statistics_need_two_samples():
    acc = GradSampleAccumulator(4)
    acc.add(torch.ones(3))
    with pytest.raises(ValueError, match="count >= 2"):
        norm_test(acc.finalize(), 0.1)


def test_per_example_grads_match_a_loop_of_backward_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def loss_fn(module, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(module(xb), yb)

    G = per_example_grads(model, loss_fn, (x, y))
    params = [p for p in model.parameters() if p.requires_grad]
    assert G.shape == (6, sum(p.numel() for p in params))
    for i in range(6):
        grads = torch.autograd.grad(loss_fn(model, (x[i : i + 1], y[i : i + 1])), params)
        assert torch.allclose(G[i], torch.cat([g.reshape(-1) for g in grads]), atol=1e-6)
    assert per_example_grads(model, loss_fn, (x, y), max_examples=2).shape[0] == 2
    as_dict = per_example_grads(model, lambda m, b: loss_fn(m, (b["x"], b["y"])), {"x": x, "y": y})
    assert torch.allclose(as_dict, G)
    with pytest.raises(TypeError, match="made of tensors"):
        per_example_grads(model, loss_fn, (x, "labels"))


@pytest.mark.parametrize("test", ["norm", "inner_product", "coordinate"])
def test_micro_batch_stats_from_hooks_equal_explicit_micro_batch_gradients(test):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    params = list(model.parameters())
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    acc, m = 3, 4
    # reference: the gradient of every micro-batch, computed on its own
    units = []
    for k in range(acc):
        grads = torch.autograd.grad(F_mse(model, x[k * m : (k + 1) * m], y[k * m : (k + 1) * m]), params)
        units.append(torch.cat([g.reshape(-1) for g in grads]))
    ref = _stats(torch.stack(units).double(), unit_size=m)
    # hooks while accumulating as Lightning does (each loss divided by the accumulation)
    mb = MicroBatchGradStats(
        params, unit_size=m, scale=acc, track_inner=test == "inner_product", track_coordinate=test == "coordinate"
    )
    mb.start()
    for k in range(acc):
        (F_mse(model, x[k * m : (k + 1) * m], y[k * m : (k + 1) * m]) / acc).backward()
        mb.after_backward()
    st = mb.finalize()
    assert not mb.active  # hooks removed
    assert st.count == acc and st.batch_size == acc * m
    a = run_sampling_test(st, test, eta=0.3, theta=0.4, nu=0.5)
    b = run_sampling_test(ref, test, eta=0.3, theta=0.4, nu=0.5)
    assert a.required_batch_size == pytest.approx(b.required_batch_size, rel=1e-4)
    # the hooks are gone: a further backward does not reach the statistics
    before = float(mb._sq)
    F_mse(model, x, y).backward()
    assert float(mb._sq) == before


def F_mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("test", ["norm", "inner_product", "coordinate"])
def test_micro_batch_stats_reduced_over_two_ranks_equal_the_pooled_micro_batches(test):
    """Two in-process "ranks" (threads whose all_reduce sums their tensors), each accumulating 2
    micro-batches of its own data: what finalize(all_reduce, total) returns on each rank equals
    the statistics of the 4 micro-batch gradients pooled."""
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    acc, m = 2, 4
    models = [copy.deepcopy(base) for _ in range(2)]
    units = []
    for r in range(2):
        for k in range(acc):
            sl = slice((r * acc + k) * m, (r * acc + k + 1) * m)
            grads = torch.autograd.grad(F_mse(base, x[sl], y[sl]), list(base.parameters()))
            units.append(torch.cat([g.reshape(-1) for g in grads]))
    ref = run_sampling_test(_stats(torch.stack(units).double(), unit_size=m), test, eta=0.3, theta=0.4, nu=0.5)

    def work(rank, reduce):
        model = models[rank]
        params = list(model.parameters())
        mb = MicroBatchGradStats(
            params, unit_size=m, scale=acc, track_inner=test == "inner_product", track_coordinate=test == "coordinate"
        )
        mb.start()
        for k in range(acc):
            sl = slice((rank * acc + k) * m, (rank * acc + k + 1) * m)
            (F_mse(model, x[sl], y[sl]) / acc).backward()
            mb.after_backward()
        # what the callback does: all-reduce the accumulated gradients, total = sum of every sample
        local = torch.cat([p.grad.reshape(-1) for p in params])
        summed = reduce(local.clone())
        return mb.finalize(all_reduce=reduce, total=summed * acc)

    for st in _run_two_ranks(work):
        assert st.count == 4 and st.batch_size == 16
        got = run_sampling_test(st, test, eta=0.3, theta=0.4, nu=0.5)
        assert got.required_batch_size == pytest.approx(ref.required_batch_size, rel=1e-4)
