"""Trainer-free maths of GradClipMedianCallback: median estimators and MedianClipper."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lit_optim.functional.grad_stats import LogMedianEstimator, MedianClipper, WindowMedian


def _param(values):
    p = torch.nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values, dtype=torch.float32)
    return p


def test_window_median_is_exact():
    g = torch.Generator().manual_seed(0)
    wm = WindowMedian(7)
    seen = []
    for v in torch.rand(30, generator=g).tolist():
        wm.update(v)
        seen.append(v)
        assert wm.median() == pytest.approx(statistics.median(seen[-7:]))
    assert len(wm) == 7


def test_log_median_estimator_tracks_the_median_of_a_heavy_tailed_stream():
    g = torch.Generator().manual_seed(1)
    # |Cauchy| has median 1 and no mean: the across-iterations estimate must sit near 1
    z = torch.tan(math.pi * (torch.rand(4000, generator=g) - 0.5)).abs()
    est = LogMedianEstimator(step=0.02)
    trace = []
    for v in z:
        est.update(v)
        trace.append(float(est.log_median))
    # the constant-step estimate hovers around the median (log 1 = 0) ...
    late = torch.tensor(trace[1000:])
    assert abs(float(late.mean())) < 0.1
    assert float(late.abs().max()) < 1.0
    # ... while the mean of the stream is nowhere near it
    assert float(z.mean()) > 3.0


def test_log_median_estimator_elementwise_moves_at_most_gamma_per_step():
    est = LogMedianEstimator(step=0.1)
    est.update(torch.tensor([1.0, 1.0]))
    est.update(torch.tensor([100.0, 0.0]))
    assert torch.allclose(est.median(), torch.tensor([math.exp(0.1), math.exp(-0.1)]))


def test_norm_mode_clips_at_factor_times_the_median_of_past_norms():
    clipper = MedianClipper("norm", window=4, factor=2.0, min_history=3)
    norms = [1.0, 2.0, 3.0]
    for n in norms:  # warm-up: no clipping yet
        p = _param([n, 0.0])
        info = clipper.clip_([p])
        assert math.isnan(info["threshold"]) and info["clipped"] == 0.0
        assert p.grad[0] == n
    p = _param([30.0, 40.0])  # norm 50, threshold 2 * median(1, 2, 3) = 4
    info = clipper.clip_([p])
    assert info["threshold"] == pytest.approx(4.0) and info["grad_norm"] == pytest.approx(50.0)
    assert float(p.grad.norm()) == pytest.approx(4.0)
    assert torch.allclose(p.grad, torch.tensor([2.4, 3.2]))  # direction kept
    # the spike enters the history unclipped, but the median barely moves: median(1, 2, 3, 50) = 2.5
    q = _param([4.0, 0.0])
    info = clipper.clip_([q])
    assert info["threshold"] == pytest.approx(5.0) and info["clipped"] == 0.0
    assert clipper.clipped_fraction == pytest.approx(1 / 5)


def test_stochastic_norm_estimator_and_global_norm_over_several_tensors():
    clipper = MedianClipper("norm", factor=1.0, estimator="stochastic", median_step=0.5, min_history=1)
    a, b = _param([3.0]), _param([4.0])
    clipper.clip_([a, b])  # observes norm 5
    a.grad, b.grad = torch.tensor([30.0]), torch.tensor([40.0])
    info = clipper.clip_([a, b])
    assert info["threshold"] == pytest.approx(5.0)
    assert math.hypot(float(a.grad), float(b.grad)) == pytest.approx(5.0)


def test_coordinate_mode_clips_each_coordinate_at_its_own_median():
    clipper = MedianClipper("coordinate", factor=2.0, median_step=0.05, min_history=2)
    p = torch.nn.Parameter(torch.zeros(3))
    for _ in range(3):
        p.grad = torch.tensor([1.0, -0.01, 5.0])
        clipper.clip_([p])
    p.grad = torch.tensor([10.0, 1.0, -6.0])
    info = clipper.clip_([p])
    # per-coordinate medians 1, 0.01, 5 -> thresholds 2, 0.02, 10
    assert torch.allclose(p.grad, torch.tensor([2.0, 0.02, -6.0]), rtol=1e-5)
    assert info["clipped_coord_fraction"] == pytest.approx(2 / 3)
    assert info["clipped"] == 1.0


def test_constant_modes_match_torch_clipping():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 3, generator=g) * 5, torch.randn(7, generator=g) * 5]
    ref = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    ours = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for r, o, t in zip(ref, ours, grads):
        r.grad, o.grad = t.clone(), t.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.5)
    MedianClipper("constant", threshold=1.5).clip_(ours)
    for r, o in zip(ref, ours):
        assert torch.allclose(r.grad, o.grad, atol=1e-6)
    for r, o, t in zip(ref, ours, grads):
        r.grad, o.grad = t.clone(), t.clone()
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    info = MedianClipper("constant_coordinate", threshold=0.7).clip_(ours)
    for r, o in zip(ref, ours):
        assert torch.equal(r.grad, o.grad)
    assert info["threshold"] == pytest.approx(0.7)


def test_non_finite_gradients_are_left_alone_and_kept_out_of_the_history():
    clipper = MedianClipper("norm", window=5, min_history=1)
    clipper.clip_([_param([1.0])])
    bad = _param([float("inf")])
    info = clipper.clip_([bad])
    assert info["nonfinite"] == 1.0 and math.isinf(float(bad.grad))
    assert list(clipper.window_median.values) == [1.0] and clipper.steps == 1


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    seq = [torch.randn(5, generator=g) * (10 if i == 7 else 1) for i in range(12)]
    for mode, kw in [("norm", {}), ("norm", {"estimator": "stochastic"}), ("coordinate", {})]:
        a = MedianClipper(mode, window=4, min_history=2, **kw)
        for t in seq[:6]:
            a.clip_([_param(t.tolist())])
        b = MedianClipper(mode, window=4, min_history=2, **kw)
        b.load_state_dict(a.state_dict())
        for t in seq[6:]:
            pa, pb = _param(t.tolist()), _param(t.tolist())
            ia, ib = a.clip_([pa]), b.clip_([pb])
            assert torch.equal(pa.grad, pb.grad)
            assert ia == ib or all(
                (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(ia.values(), ib.values())
            )


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mode": "median"}, ValueError, "mode must be one of"),
        ({"window": 0}, ValueError, "window must be an integer >= 1, got 0"),
        ({"factor": 0.0}, ValueError, r"factor must be in \(0, inf\), got 0.0"),
        ({"mode": "constant"}, ValueError, "needs threshold"),
        ({"threshold": 1.0}, ValueError, "only used by the constant modes"),
        ({"estimator": "ema"}, ValueError, "estimator must be one of"),
        ({"median_step": -1.0}, ValueError, "median_step must be in"),
        ({"window": 2.5}, TypeError, "window must be an int"),
    ],
)
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MedianClipper(**kwargs)


def test_coordinate_estimate_is_the_log_domain_proximal_step():
    """The coordinate mode keeps m in the linear domain (m <- m * clip(|g|/m, e^-g, e^g)); it must
    equal LogMedianEstimator's log u <- u + clip(log|g| - u, +-g) coordinate by coordinate."""
    g = torch.Generator().manual_seed(4)
    clipper = MedianClipper("coordinate", factor=1e9, median_step=0.1, min_history=1)
    ref = LogMedianEstimator(step=0.1)
    p = torch.nn.Parameter(torch.zeros(50))
    for _ in range(40):
        z = torch.randn(50, generator=g) * torch.rand(50, generator=g).mul(5).exp()
        p.grad = z.clone()
        clipper.clip_([p])
        ref.update(z)
    assert torch.allclose(clipper.coord_medians[0], ref.median(), rtol=1e-4)
    assert clipper.mean_threshold() == pytest.approx(1e9 * float(ref.median().mean()), rel=1e-4)
