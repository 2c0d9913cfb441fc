"""Issue 15 fixes in the elementwise family (AdaBelief, AdaBound, AdaGrad, AdaGradNorm, AdaHessian,
Adan, diffGrad, EXAdam, Lion, Sophia): EXAdam's dynamic step size (item 4), eps=0 (item 7),
float16/bfloat16 parameters (items 8 and 25), update_hessian with large finite estimates (item 5)
and defaults that train (item 16)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.optim import NonFiniteGradientError

ELEMENTWISE = [
    lit_optim.AdaBelief,
    lit_optim.AdaBound,
    lit_optim.AdaGrad,
    lit_optim.AdaGradNorm,
    lit_optim.AdaHessian,
    lit_optim.Adan,
    lit_optim.DiffGrad,
    lit_optim.EXAdam,
    lit_optim.Lion,
    lit_optim.Sophia,
]
IDS = [c.__name__ for c in ELEMENTWISE]


def _step(opt, params):
    """One step; the curvature consumers get a synthetic estimate |g| first."""
    if hasattr(opt, "update_hessian"):
        opt.update_hessian([None if p.grad is None else p.grad.detach().abs().float() for p in params])
    opt.step()


# ------------------------------------------------------------------------------------ item 4: EXAdam


def exadam_rule(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0, dynamic=True):
    """EXAdam as written in arXiv:2412.20302v1, Algorithm 1, plus the author's decoupled weight decay
    (with the base lr)."""
    b1, b2 = betas
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d1 = 1 + v / (v + eps) * b2**t
        d2 = 1 + m * m / (m * m + eps) * b1**t
        m_t = m / (1 - b1**t) * d1
        v_t = v / (1 - b2**t) * d2
        g_t = g / (1 - b1**t) * d1
        alpha = lr * math.log(math.sqrt(2) * math.sqrt(t + 1)) if dynamic else lr
        p = p - alpha * (m_t + g_t) / (torch.sqrt(v_t) + eps)
    return p


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_exadam_dynamic_step_size_matches_the_paper(dynamic, foreach):
    torch.manual_seed(0)
    p0 = torch.randn(4, 5, dtype=torch.float64)
    grads = [torch.randn(4, 5, dtype=torch.float64) for _ in range(12)]
    p = nn.Parameter(p0.clone())
    opt = lit_optim.EXAdam([p], lr=0.02, weight_decay=0.1, dynamic_step_size=dynamic, foreach=foreach)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = exadam_rule(p0, grads, 0.02, wd=0.1, dynamic=dynamic)
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=0)


def test_exadam_dynamic_step_size_is_the_default_and_grows_with_ln():
    p = nn.Parameter(torch.zeros(3))
    opt = lit_optim.EXAdam([p])
    assert opt.defaults["dynamic_step_size"] is True
    assert lit_optim.EXAdam.step_size_factor(1) == pytest.approx(math.log(2.0))
    assert lit_optim.EXAdam.step_size_factor(1000) == pytest.approx(math.log(math.sqrt(2) * math.sqrt(1001)))
    # the first step is ln(2) times the constant-lr step; the ratio grows with t
    ps = [nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2)]
    opts = [lit_optim.EXAdam([q], lr=0.1, dynamic_step_size=d) for q, d in zip(ps, (True, False))]
    for q, o in zip(ps, opts):
        q.grad = torch.ones(3, dtype=torch.float64)
        o.step()
    torch.testing.assert_close(ps[0].detach(), ps[1].detach() * math.log(2.0), atol=1e-15, rtol=0)
    # a param group may switch it off on its own
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = lit_optim.EXAdam([{"params": [a]}, {"params": [b], "dynamic_step_size": False}])
    assert [g["dynamic_step_size"] for g in opt.param_groups] == [True, False]


def test_exadam_state_dict_from_before_the_switch_keeps_the_constant_step():
    """A checkpoint saved before ``dynamic_step_size`` existed was trained with a constant lr."""
    p0 = torch.randn(3, 2, dtype=torch.float64)
    grads = [torch.randn(3, 2, dtype=torch.float64) for _ in range(4)]
    p = nn.Parameter(p0.clone())
    opt = lit_optim.EXAdam([p], lr=0.05, dynamic_step_size=False)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    del old["param_groups"][0]["dynamic_step_size"]
    q = nn.Parameter(p.detach().clone())
    opt2 = lit_optim.EXAdam([q], lr=0.05)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["dynamic_step_size"] is False
    for g in grads[2:]:
        for x, o in ((p, opt), (q, opt2)):
            x.grad = g.clone()
            o.step()
    assert torch.equal(p, q)
    # a current state dict keeps its setting
    opt3 = lit_optim.EXAdam([nn.Parameter(q.detach().clone())], lr=0.05, dynamic_step_size=False)
    opt3.load_state_dict(lit_optim.EXAdam([nn.Parameter(q.detach().clone())], lr=0.05).state_dict())
    assert opt3.param_groups[0]["dynamic_step_size"] is True


# ------------------------------------------------------------------------------------ item 7: eps=0

EPS_REFUSED = [lit_optim.AdaBelief, lit_optim.AdaHessian, lit_optim.Adan, lit_optim.DiffGrad, lit_optim.EXAdam]


@pytest.mark.parametrize("cls", EPS_REFUSED, ids=lambda c: c.__name__)
def test_eps_zero_is_refused_where_it_divides_zero_by_zero(cls):
    p = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\), got 0\.0.*\(Invalid epsilon value: 0\.0\).*by 0"):
        cls([p], eps=0.0)
    # a parameter-group dict is checked like the constructor
    q = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\), got 0\.0"):
        cls([{"params": [p]}, {"params": [q], "eps": 0.0}])


def test_adagrad_eps_zero_only_with_a_positive_initial_accumulator():
    p = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\) when initial_accumulator_value is 0"):
        lit_optim.AdaGrad([p], eps=0.0)
    q = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"initial_accumulator_value is 0"):
        lit_optim.AdaGrad([{"params": [p], "initial_accumulator_value": 0.1}, {"params": [q]}], eps=0.0)
    lit_optim.AdaGrad([p], eps=0.0, initial_accumulator_value=0.1)  # accepted: the denominator is > 0


@pytest.mark.parametrize(
    "cls,kw",
    [
        (lit_optim.AdaBound, {"eps": 0.0}),
        (lit_optim.AdaBound, {"eps": 0.0, "amsbound": True}),
        (lit_optim.AdaGradNorm, {"eps": 0.0}),
        (lit_optim.AdaGrad, {"eps": 0.0, "initial_accumulator_value": 0.1}),
        (lit_optim.Lion, {}),
    ]
    + [(c, {"eps": 1e-30}) for c in EPS_REFUSED],
    ids=lambda x: x.__name__ if isinstance(x, type) else str(x),
)
def test_zero_gradient_coordinates_never_write_nan(cls, kw):
    """A coordinate (or a whole parameter) whose gradient is exactly zero at every step stays put."""
    w = nn.Parameter(torch.randn(4, 3))
    z = nn.Parameter(torch.randn(5))
    before_w, before_z = w.detach().clone(), z.detach().clone()
    opt = cls([w, z], lr=0.1, **kw)
    for t in range(3):
        g = torch.randn(4, 3)
        g[0] = 0.0
        w.grad, z.grad = g, torch.zeros(5)
        _step(opt, [w, z])
        assert torch.isfinite(w).all() and torch.isfinite(z).all(), f"step {t}"
    assert torch.equal(w[0], before_w[0])
    assert torch.equal(z, before_z)
    assert not torch.equal(w[1:], before_w[1:])


def test_adabound_eps_zero_with_lr_zero_does_not_write_nan():
    """lr 0 (a warm-up's first step) with eps=0 would give inf * 0 = NaN in the step size."""
    w = nn.Parameter(torch.randn(4, 3))
    opt = lit_optim.AdaBound([w], lr=0.1, eps=0.0)
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    w.grad = torch.zeros(4, 3)
    opt.step()
    assert torch.equal(w, before)


# ------------------------------------------------------------------------------------ item 8: float16


@pytest.mark.parametrize("cls", ELEMENTWISE, ids=IDS)
def test_float16_small_gradients_stay_finite_and_descend(cls):
    """AdaBelief at lr 1e-2 with gradient 1e-4 wrote inf into float16 weights (1e-8 and eps
    underflow in float16); the update now runs in float32."""
    p = nn.Parameter(torch.ones(8, 4, dtype=torch.float16))
    opt = cls([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.full_like(p, 1e-4)
        _step(opt, [p])
        assert torch.isfinite(p).all()
    assert (p < 1).all(), "a positive gradient must lower every weight"
    # the state is float32
    for k, v in opt.state[p].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype == torch.float32, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ELEMENTWISE, ids=IDS)
def test_low_precision_step_is_the_float32_step_rounded_once(cls, dtype):
    torch.manual_seed(1)
    p0 = torch.randn(6, 5).to(dtype)
    g0 = torch.randn(6, 5).to(dtype)
    lo = nn.Parameter(p0.clone())
    hi = nn.Parameter(p0.float())
    for q, g in ((lo, g0), (hi, g0.float())):
        opt = cls([q], lr=1e-2)
        q.grad = g.clone()
        _step(opt, [q])
    assert torch.equal(lo.detach(), hi.detach().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ELEMENTWISE, ids=IDS)
def test_low_precision_foreach_equals_for_loop_bitwise(cls, dtype):
    """Item 25: AdaBound (and Adan, EXAdam) differed by a bfloat16 rounding step between the two
    paths (torch._foreach_mul_ with a Python scalar rounds the scalar to bfloat16 on CPU)."""
    torch.manual_seed(2)
    shapes = [(7, 5), (5,), (0, 3), (3, 2, 2)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(4)]
    out = []
    for foreach in (True, False):
        ps = [nn.Parameter(x.clone()) for x in init]
        kw = {"weight_decay": 0.01} if cls is not lit_optim.Sophia else {}
        opt = cls(ps, lr=1e-2, foreach=foreach, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            _step(opt, ps)
        out.append(ps)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", ELEMENTWISE, ids=IDS)
def test_low_precision_state_survives_state_dict_round_trip_in_float32(cls):
    ps = [nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))]
    opt = cls(ps, lr=1e-2)
    for t in range(2):
        ps[0].grad = torch.randn(4, 3, dtype=torch.bfloat16)
        _step(opt, ps)
    sd = copy.deepcopy(opt.state_dict())
    ps2 = [nn.Parameter(ps[0].detach().clone())]
    opt2 = cls(ps2, lr=1e-2)
    opt2.load_state_dict(sd)
    for k, v in opt.state[ps[0]].items():
        if isinstance(v, torch.Tensor):
            assert opt2.state[ps2[0]][k].dtype == v.dtype
            assert torch.equal(opt2.state[ps2[0]][k], v), k
    g = torch.randn(4, 3, dtype=torch.bfloat16)
    for q, o in ((ps, opt), (ps2, opt2)):
        q[0].grad = g.clone()
        _step(o, q)
    assert torch.equal(ps[0], ps2[0])


def test_adagradnorm_float16_norm_does_not_overflow():
    """A float16 norm overflows at 65504 (1000 entries of 2100 have norm 66400)."""
    p = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    opt = lit_optim.AdaGradNorm([p], lr=1.0)
    p.grad = torch.full_like(p, 2100.0)
    opt.step()
    assert opt.param_groups[0]["sum_sq_norm"] == pytest.approx(1000 * 2100.0**2, rel=1e-5)
    assert torch.isfinite(p).all() and (p < 0).all()


# ------------------------------------------------------------------------------------ item 5: update_hessian


@pytest.mark.parametrize("cls", [lit_optim.Sophia, lit_optim.AdaHessian], ids=lambda c: c.__name__)
def test_update_hessian_accepts_large_finite_estimates(cls):
    """Summed per-tensor norms overflowed for finite estimates and update_hessian raised a bare
    StopIteration; only NaN/Inf entries are refused now."""
    a = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    b = nn.Parameter(torch.zeros(4))
    opt = cls([a, b])
    opt.update_hessian([torch.full((1000,), 2100.0, dtype=torch.float16), torch.full((4,), 1e19)])
    key = "hessian" if cls is lit_optim.Sophia else "exp_hessian_diag_sq"
    assert torch.isfinite(opt.state[a][key]).all() and opt.state[a][key].gt(0).all()
    assert torch.isfinite(opt.state[b][key]).all()
    with pytest.raises(NonFiniteGradientError, match=r"non-finite Hessian estimate .* shape \(4,\)"):
        opt.update_hessian([torch.ones(1000, dtype=torch.float16), torch.tensor([1.0, float("inf"), 1.0, 1.0])])


# ------------------------------------------------------------------------------------ item 16: defaults


def test_registry_default_lr_is_the_constructor_default():
    import inspect

    for name, info in lit_optim.OPTIMIZERS.items():
        if info.cls not in ELEMENTWISE:
            continue
        default = inspect.signature(info.cls.__init__).parameters["lr"].default
        assert info.default_lr == default, name


def test_adahessian_default_lr_trains_a_small_mlp_on_digits():
    """At the paper's lr 0.15 AdaHessian diverged within 5 steps on this problem
    (NonFiniteGradientError); the default must train it."""
    from lit_optim.tasks import digits_data

    train, _ = digits_data(seed=0)
    x, y = train.tensors
    x = x.reshape(len(x), -1)[:256]
    y = y[:256]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
    opt = lit_optim.AdaHessian(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for i in range(30):
        xb, yb = x[(i * 32) % 256 :][:32], y[(i * 32) % 256 :][:32]
        losses.append(opt.step(lambda xb=xb, yb=yb: loss_fn(model(xb), yb)).item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
