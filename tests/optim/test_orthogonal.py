"""The orthogonalized family beyond the shared table: orthogonality of the updates, shapes (1-D,
2-D, conv, stacked 3-D), whole-model groups and schedules, bf16, noise-adaptive layerwise rates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.functional.newton_schulz import PRESET_BANDS, polar_factor
from lit_optim.optim import optimizer_state_bytes
from lit_optim.optim._orthogonal import lr_adjustment, matrix_view_shape

NS_FAMILY = [lit_optim.Muon, lit_optim.NorMuon, lit_optim.ROOT, lit_optim.AdaGO, lit_optim.HybridAuON]
ALL = NS_FAMILY + [lit_optim.AuON, lit_optim.SinkGD]
BAND = PRESET_BANDS["quintic"]


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def update_of(cls, p0, grad, **kw):
    p = nn.Parameter(p0.clone())
    opt = cls([p], **kw)
    step_with(opt, [p], [grad])
    return (p0 - p.detach()), opt


def test_muon_update_is_the_polar_factor_of_the_gradient():
    g = torch.randn(12, 20, dtype=torch.float64)
    p0 = torch.randn(12, 20, dtype=torch.float64)
    d, _ = update_of(
        lit_optim.Muon,
        p0,
        g,
        lr=0.5,
        momentum=0.0,
        nesterov=False,
        ns_coefficients="cubic",
        ns_steps=40,
        adjust_lr="none",
    )
    torch.testing.assert_close(d / 0.5, polar_factor(g), atol=1e-8, rtol=0)


@pytest.mark.parametrize("cls", [lit_optim.Muon, lit_optim.ROOT, lit_optim.AdaGO])
def test_updates_are_orthogonal_up_to_the_quintic_band(cls):
    g = torch.randn(16, 24, dtype=torch.float64)
    d, _ = update_of(cls, torch.zeros(16, 24, dtype=torch.float64), g, lr=0.1, adjust_lr="none")
    # AdaGO's first step size is lr * min(|G|, gamma) / sqrt(v0^2 + min(|G|, gamma)^2) = lr (1 - 5e-9)
    rel = torch.linalg.svdvals(d) / 0.1
    lo, hi = BAND if cls is not lit_optim.ROOT else (0.75, 1.45)  # ROOT: size-fitted coefficients
    assert rel.min() > lo * 0.999 and rel.max() < hi * 1.001, (rel.min(), rel.max())


def test_normuon_rows_are_equalized_and_norm_preserved():
    torch.manual_seed(0)
    g = torch.randn(10, 30, dtype=torch.float64)
    g[0] *= 50  # one very loud neuron
    d_muon, _ = update_of(lit_optim.Muon, torch.zeros_like(g), g, lr=1.0, adjust_lr="none")
    d_nor, opt = update_of(lit_optim.NorMuon, torch.zeros_like(g), g, lr=1.0, adjust_lr="none", beta2=0.0)
    # beta2=0: v = row mean of O^2, so every row of the normalized update has the same RMS
    rms = d_nor.square().mean(dim=1).sqrt()
    assert (rms.max() / rms.min()) < 1.0 + 1e-6
    torch.testing.assert_close(torch.linalg.matrix_norm(d_nor), torch.linalg.matrix_norm(d_muon), rtol=1e-8, atol=0)
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["second_moment"].shape == (10,)


def test_auon_update_is_inside_the_unit_spectral_trust_region():
    for scale in (1e-3, 1.0, 1e3):
        g = torch.randn(9, 13, dtype=torch.float64) * scale
        g[2, 3] = 40 * scale
        d, _ = update_of(lit_optim.AuON, torch.zeros(9, 13, dtype=torch.float64), g, lr=1.0, adjust_lr="none")
        assert torch.linalg.matrix_norm(d, ord=2) <= torch.linalg.matrix_norm(d) <= 1.0 + 1e-12


def test_sinkgd_update_rows_and_columns_are_normalized_and_it_keeps_no_matrix_state():
    g = torch.randn(6, 10, dtype=torch.float64) * torch.logspace(-3, 3, 10, dtype=torch.float64)
    d, opt = update_of(lit_optim.SinkGD, torch.zeros(6, 10, dtype=torch.float64), g, lr=1.0, iters=50)
    torch.testing.assert_close(d.norm(dim=0), torch.full((10,), math.sqrt(6), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(d.norm(dim=1), torch.full((6,), math.sqrt(10), dtype=torch.float64), atol=1e-6, rtol=0)
    assert optimizer_state_bytes(opt) == 0
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"step"}


# ----------------------------------------------------------------------------------- shapes


def test_matrix_views_and_shape_factors():
    assert matrix_view_shape((7,)) == (1, 7)
    assert matrix_view_shape(()) == (1, 1)
    assert matrix_view_shape((8, 4, 3, 3)) == (8, 36)
    assert matrix_view_shape((4, 5, 6)) == (4, 5, 6)
    assert matrix_view_shape((4, 5, 6), "flatten") == (4, 30)
    assert matrix_view_shape((2, 3, 4, 5), "batch") == (6, 4, 5)
    assert lr_adjustment(20, 5, "original") == 2.0 and lr_adjustment(5, 20, "original") == 1.0
    assert lr_adjustment(16, 64, "match_rms_adamw") == pytest.approx(1.6)
    assert lr_adjustment(3, 4, "none") == 1.0


@pytest.mark.parametrize("cls", ALL)
def test_conv_stacked_and_vector_shapes(cls):
    torch.manual_seed(1)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3, dtype=torch.float64))
    experts = nn.Parameter(torch.randn(4, 6, 10, dtype=torch.float64))
    vec = nn.Parameter(torch.randn(7, dtype=torch.float64))
    params = [conv, experts, vec]
    before = [p.detach().clone() for p in params]
    opt = cls([{"params": [conv, experts]}, {"params": [vec], "use_muon": True}], lr=0.1, adjust_lr="none")
    grads = [torch.randn_like(p) for p in params]
    step_with(opt, params, grads)
    deltas = [(b - p.detach()) / 0.1 for b, p in zip(before, params)]
    for d, p in zip(deltas, params):
        assert d.shape == p.shape and torch.isfinite(d).all() and d.abs().sum() > 0
    if cls in (lit_optim.Muon, lit_optim.ROOT):
        lo, hi = BAND if cls is lit_optim.Muon else (0.6, 1.45)
        s = torch.linalg.svdvals(deltas[0].reshape(8, 27))  # conv kernel as (out, in*k*k)
        assert s.min() > lo and s.max() < hi
        for e in range(4):  # each expert matrix orthogonalized on its own
            s = torch.linalg.svdvals(deltas[1][e])
            assert s.min() > lo and s.max() < hi
    if cls is lit_optim.Muon:
        # the stacked update equals orthogonalizing each expert alone
        single = []
        for e in range(4):
            q = nn.Parameter(before[1][e].clone())
            o = lit_optim.Muon([q], lr=0.1, adjust_lr="none")
            step_with(o, [q], [grads[1][e]])
            single.append((before[1][e] - q.detach()) / 0.1)
        torch.testing.assert_close(deltas[1], torch.stack(single), atol=1e-12, rtol=0)
        # a vector forced through Muon moves along its normalized gradient (a 1 x n matrix)
        cos = torch.nn.functional.cosine_similarity(deltas[2], grads[2] * (1 - 0.95 * 0), dim=0)
        assert cos > 0.999


def test_conv1d_kernels_are_flattened_by_matrix_groups():
    net = nn.Sequential(nn.Conv1d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 6, 5), nn.Linear(5, 3))
    groups = lit_optim.param_groups.matrix_groups(net)
    flat = [g for g in groups if g.get("matrix_view") == "flatten"]
    assert len(flat) == 1 and flat[0]["params"][0] is net[0].weight
    opt = lit_optim.create_optimizer(net, "muon", lr=0.1, adjust_lr="none")
    w0 = net[0].weight.detach().clone()
    net(torch.randn(2, 4, 8)).sum().backward()
    opt.step()
    s = torch.linalg.svdvals(((w0 - net[0].weight.detach()) / 0.1).reshape(6, 12))
    assert s.min() > BAND[0] * 0.99 and s.max() < BAND[1] * 1.01


# ----------------------------------------------------------------------------------- whole models


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.fc(self.emb(x)))))


@pytest.mark.parametrize("name", ["muon", "normuon", "auon", "hybrid_auon", "root", "adago", "sinkgd"])
def test_create_optimizer_splits_the_model_and_schedules_scale_both_parts(name):
    torch.manual_seed(0)
    net = TinyLM()
    opt = lit_optim.create_optimizer(net, name, lr=0.05, weight_decay=0.01, adam_lr=0.004)
    info = lit_optim.get_optimizer_info(name)
    assert type(opt) is info.cls
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(net.fc.weight)]["use_muon"] is True and by_id[id(net.fc.weight)]["lr"] == 0.05
    for p in (net.emb.weight, net.head.weight, net.fc.bias, net.norm.weight):
        g = by_id[id(p)]
        assert g["use_muon"] is False and g["lr"] == pytest.approx(0.004)
    assert by_id[id(net.emb.weight)]["weight_decay"] == 0.01 and by_id[id(net.fc.bias)]["weight_decay"] == 0.0
    x = torch.randint(0, 11, (4, 5))
    net(x).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[net.emb.weight] and "exp_avg" not in opt.state[net.fc.weight]
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert by_id[id(net.fc.weight)]["lr"] == pytest.approx(0.025)
    assert by_id[id(net.emb.weight)]["lr"] == pytest.approx(0.002)


def test_groups_without_use_muon_keep_adamw_lr_as_a_ratio():
    w = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.zeros(4))
    opt = lit_optim.Muon([w, b], lr=0.02, adam_lr=0.001)
    assert opt.param_groups[0]["adam_lr_ratio"] == pytest.approx(0.05)
    step_with(opt, [w, b], [torch.randn(4, 6), torch.ones(4)])
    # first AdamW step moves each coordinate by lr_adam (sign-like), lr_adam = 0.02 * 0.05
    torch.testing.assert_close(b.detach(), torch.full((4,), -0.001), rtol=1e-4, atol=1e-7)
    opt.param_groups[0]["lr"] = 0.04  # a schedule doubling lr doubles the AdamW part too
    b0 = b.detach().clone()
    step_with(opt, [w, b], [torch.randn(4, 6), torch.ones(4)])
    torch.testing.assert_close(b0 - b.detach(), torch.full((4,), 0.002), rtol=1e-4, atol=1e-7)


def _first_adamw_step(opt, w, b):
    """Size of the first AdamW step of the 1-D parameter ``b`` (sign-like: |step| = AdamW's lr)."""
    b0 = b.detach().clone()
    step_with(opt, [w, b], [torch.randn(w.shape), torch.ones(b.shape)])
    return float((b0 - b.detach()).abs().max())


def test_group_lr_overrides_do_not_rescale_the_adamw_part():
    """Issue 15 item 23: a group with its own lr keeps AdamW at adam_lr (its own or the
    constructor's), not at adam_lr * group lr / constructor lr."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.zeros(4))
    # extreme: constructor lr 1e-28, group lr 1e-3; before the fix AdamW ran at 3e-4 * 1e-3 / 1e-28 = 3e21
    opt = lit_optim.Muon([{"params": [w, b], "lr": 1e-3}], lr=1e-28, adam_lr=3e-4)
    assert opt.param_groups[0]["adam_lr"] == 3e-4
    assert opt.param_groups[0]["adam_lr_ratio"] == pytest.approx(0.3)
    assert _first_adamw_step(opt, w, b) == pytest.approx(3e-4, rel=1e-3)
    assert torch.isfinite(w).all()
    # a group may state its own adam_lr; another group keeps the constructor's
    w2, b2 = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.zeros(4))
    w3, b3 = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.zeros(4))
    opt = lit_optim.NorMuon(
        [{"params": [w2, b2], "lr": 0.05, "adam_lr": 1e-2}, {"params": [w3, b3], "lr": 0.001}], lr=0.02, adam_lr=2e-3
    )
    g2, g3 = opt.param_groups
    assert (g2["adam_lr"], g3["adam_lr"]) == (1e-2, 2e-3)
    b2_0, b3_0 = b2.detach().clone(), b3.detach().clone()
    step_with(opt, [w2, b2, w3, b3], [torch.randn(4, 6), torch.ones(4), torch.randn(4, 6), torch.ones(4)])
    torch.testing.assert_close(b2_0 - b2.detach(), torch.full((4,), 1e-2), rtol=1e-3, atol=0)
    torch.testing.assert_close(b3_0 - b3.detach(), torch.full((4,), 2e-3), rtol=1e-3, atol=0)
    # a scheduler scales both parts of every group by the same factor
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert g2["lr"] == pytest.approx(0.025) and g3["lr"] == pytest.approx(0.0005)
    b2_0, b3_0 = b2.detach().clone(), b3.detach().clone()
    step_with(opt, [w2, b2, w3, b3], [torch.randn(4, 6), torch.ones(4), torch.randn(4, 6), torch.ones(4)])
    # second AdamW step with a constant gradient is again sign-like: |step| = lr
    torch.testing.assert_close(b2_0 - b2.detach(), torch.full((4,), 5e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(b3_0 - b3.detach(), torch.full((4,), 1e-3), rtol=1e-3, atol=0)


def test_use_muon_false_groups_take_adam_lr_as_their_lr():
    e = nn.Parameter(torch.randn(5, 3))
    w = nn.Parameter(torch.randn(4, 6))
    opt = lit_optim.Muon(
        [{"params": [w], "use_muon": True, "lr": 0.0}, {"params": [e], "use_muon": False, "adam_lr": 5e-3}],
        lr=0.0,  # lr=0 is fine where no group holds AdamW parameters relative to it
    )
    g = opt.param_groups[1]
    assert g["lr"] == g["adam_lr"] == 5e-3 and g["adam_lr_ratio"] == 1.0
    with pytest.raises(ValueError, match="sets both 'lr' and 'adam_lr'"):
        lit_optim.Muon([{"params": [e], "use_muon": False, "lr": 1e-3, "adam_lr": 5e-3}])
    with pytest.raises(ValueError, match="lr must be > 0 when adam_lr != 0"):
        lit_optim.Muon([{"params": [w], "lr": 0.0}], lr=0.02)


def test_use_muon_overrides_and_group_errors():
    w = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.zeros(4))
    opt = lit_optim.Muon(
        [{"params": [w], "use_muon": False, "betas": (0.8, 0.9), "eps": 1e-6}, {"params": [b], "use_muon": True}]
    )
    assert opt.param_groups[0]["adam_betas"] == (0.8, 0.9) and opt.param_groups[0]["adam_eps"] == 1e-6
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4)
    step_with(opt, [w, b], [torch.randn(4, 6), torch.randn(4)])
    assert "exp_avg" in opt.state[w] and "momentum_buffer" in opt.state[b]
    with pytest.raises(TypeError, match="use_muon must be True, False or absent, got 'yes'"):
        lit_optim.Muon([{"params": [w], "use_muon": "yes"}])
    with pytest.raises(ValueError, match=r"matrix_view must be one of \['auto', 'flatten', 'batch'\], got 'rows'"):
        lit_optim.NorMuon([{"params": [w], "matrix_view": "rows"}])
    with pytest.raises(ValueError, match="sets both 'betas' and 'adam_betas'"):
        lit_optim.Muon([{"params": [w], "use_muon": False, "betas": (0.9, 0.9), "adam_betas": (0.9, 0.9)}])
    with pytest.raises(ValueError, match="lr must be > 0 when adam_lr != 0"):
        lit_optim.Muon([w], lr=0.0)


# ----------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("cls", ALL)
def test_bfloat16_parameters_and_bfloat16_newton_schulz(cls):
    torch.manual_seed(2)
    kw = {"ns_dtype": "bfloat16"} if cls in NS_FAMILY else {}
    w = nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    opt = cls([w, b], lr=0.05, **kw)
    w0 = w.detach().clone()
    for _ in range(3):
        step_with(opt, [w, b], [torch.randn(16, 24, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)])
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all() and not torch.equal(w, w0)
    for key in ("sum_sq", "second_moment"):
        if key in opt.state[w]:
            assert opt.state[w][key].dtype == torch.float32


def test_float32_statistics_of_bf16_parameters_survive_state_dict_loading():
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = lit_optim.AdaGO([w], layerwise_noise_adaptive=True)
    for _ in range(3):
        step_with(opt, [w], [torch.randn(8, 8, dtype=torch.bfloat16)])
    saved = copy.deepcopy(opt.state_dict())
    w2 = nn.Parameter(w.detach().clone())
    opt2 = lit_optim.AdaGO([w2], layerwise_noise_adaptive=True)
    opt2.load_state_dict(saved)
    for key in ("sum_sq", "noise_sq"):
        assert opt2.state[w2][key].dtype == torch.float32
        assert torch.equal(opt2.state[w2][key], opt.state[w][key])
    assert opt2.state[w2]["momentum_buffer"].dtype == torch.bfloat16
    g = torch.randn(8, 8, dtype=torch.bfloat16)
    step_with(opt, [w], [g])
    step_with(opt2, [w2], [g])
    assert torch.equal(w, w2)


# ----------------------------------------------------------------------------------- noise adaptive


@pytest.mark.parametrize("cls", [lit_optim.Muon, lit_optim.AuON, lit_optim.SinkGD])
def test_noise_adaptive_layerwise_rates_slow_the_noisy_layer(cls):
    torch.manual_seed(4)
    quiet = nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))
    noisy = nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))
    opt = cls([quiet, noisy], lr=0.01, layerwise_noise_adaptive=True, noise_beta=0.9, noise_clip=10.0, adjust_lr="none")
    base = cls([nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))], lr=0.01, adjust_lr="none")
    signal = torch.randn(8, 12, dtype=torch.float64)
    for _ in range(30):
        q0, n0 = quiet.detach().clone(), noisy.detach().clone()
        gq = signal + 0.01 * torch.randn(8, 12, dtype=torch.float64)
        gn = signal + 3.0 * torch.randn(8, 12, dtype=torch.float64)
        step_with(opt, [quiet, noisy], [gq, gn])
    h_quiet, h_noisy = opt.state[quiet]["noise_sq"], opt.state[noisy]["noise_sq"]
    assert h_noisy > 100 * h_quiet
    dq = torch.linalg.matrix_norm(q0 - quiet.detach())
    dn = torch.linalg.matrix_norm(n0 - noisy.detach())
    # without the option both would move by the same norm (same shapes, normalized updates)
    assert dq > 3 * dn
    # the factors' geometric mean is 1: sqrt(dq * dn) ~ what a plain step moves (up to the transform's scale)
    p = base.param_groups[0]["params"][0]
    step_with(base, [p], [gq])
    plain = torch.linalg.matrix_norm(p.detach())
    assert math.isclose(math.sqrt(dq * dn), plain, rel_tol=0.35)


def test_single_matrix_group_has_factor_one():
    torch.manual_seed(5)
    a = nn.Parameter(torch.zeros(6, 6, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(6, 6, dtype=torch.float64))
    o1 = lit_optim.Muon([a], lr=0.1, layerwise_noise_adaptive=True)
    o2 = lit_optim.Muon([b], lr=0.1)
    for _ in range(4):
        g = torch.randn(6, 6, dtype=torch.float64)
        step_with(o1, [a], [g])
        step_with(o2, [b], [g])
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_distributed_flag_without_a_process_group_runs_locally():
    w = nn.Parameter(torch.randn(6, 9))
    opt = lit_optim.Muon([w], distributed=True)
    step_with(opt, [w], [torch.randn(6, 9)])
    assert opt.last_ns_stats == {
        "matrices": 1,
        "local_matrices": 1,
        "world_size": 1,
        "sent_bytes": 0,
        "received_bytes": 0,
    }


def test_noise_adaptive_ignores_empty_matrices():
    torch.manual_seed(6)
    ps = [nn.Parameter(torch.zeros(5, 7, dtype=torch.float64)) for _ in range(2)]
    ps_empty = [nn.Parameter(p.detach().clone()) for p in ps] + [nn.Parameter(torch.zeros(0, 4, dtype=torch.float64))]
    o1 = lit_optim.Muon(ps, lr=0.1, layerwise_noise_adaptive=True)
    o2 = lit_optim.Muon(ps_empty, lr=0.1, layerwise_noise_adaptive=True)
    for _ in range(4):
        gs = [torch.randn(5, 7, dtype=torch.float64) * s for s in (1.0, 5.0)]
        step_with(o1, ps, gs)
        step_with(o2, ps_empty, [*gs, torch.zeros(0, 4, dtype=torch.float64)])
    for a, b in zip(ps, ps_empty):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_root_with_coefficients_fitted_to_the_matrix_size():
    torch.manual_seed(7)
    g = torch.randn(8, 24, dtype=torch.float64)

    def run(coefficients):
        return update_of(
            lit_optim.ROOT,
            torch.zeros(8, 24, dtype=torch.float64),
            g,
            lr=0.1,
            adjust_lr="none",
            ns_coefficients=coefficients,
            threshold_quantile=1.0,
        )

    d, opt = run("fit")
    assert opt.param_groups[0]["ns_coefficients"] == "fit"
    s = torch.linalg.svdvals(d / 0.1)
    # the fitted schedule brings a Gaussian matrix of this size closer to orthogonal than the quintic
    q, _ = run("quintic")
    sq = torch.linalg.svdvals(q / 0.1)
    assert (s - 1).abs().max() < (sq - 1).abs().max()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["ns_coefficients"] == "fit"


# ----------------------------------------------------------------------------------- fidelity


def test_hybrid_auon_divides_the_newton_schulz_output_by_its_cosh_rms():
    """Issue 15 item 1: the paper's Y / (rms(cosh(Y)) + delta) after one quintic step, without a
    second Frobenius normalization (the old form was about 2.8x smaller here)."""
    torch.manual_seed(8)
    g = torch.randn(12, 20, dtype=torch.float64)
    d, _ = update_of(
        lit_optim.HybridAuON, torch.zeros_like(g), g, lr=1.0, momentum=0.0, nesterov=False, adjust_lr="none"
    )
    x = g / (torch.linalg.matrix_norm(g) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    gram = x @ x.T
    y = a * x + (b * gram + c * gram @ gram) @ x
    expected = y / (torch.sqrt(torch.mean(torch.cosh(y) ** 2)) + 1e-8)
    torch.testing.assert_close(d, expected, atol=1e-12, rtol=0)
    old = lit_optim.functional.normalize.cosh_rms_normalize(y, 1.5)
    assert torch.linalg.matrix_norm(d) > 2.5 * torch.linalg.matrix_norm(old)


def _run_paths(cls, dtype):
    shapes = [(5, 4), (4,), (3, 2, 2, 2), (6, 3), (0, 3), (2, 3, 4)]
    results = []
    for foreach in (True, False):
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = cls(ps, lr=0.05, weight_decay=0.05, adam_weight_decay=0.1, layerwise_noise_adaptive=True, foreach=foreach)
        for _ in range(4):
            step_with(opt, ps, [torch.randn(p.shape, generator=gen).to(dtype) for p in ps])
        results.append(ps)
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [lit_optim.AuON, lit_optim.SinkGD])
def test_foreach_and_per_tensor_paths_are_bit_identical_without_newton_schulz(cls, dtype):
    """Issue 15 item 25: with weight decay on both parts, the linear-time optimizers end
    bit-identical on both paths in every dtype they accept (before, bf16 differed: torch's CPU
    _foreach_mul_ with a Python scalar rounds the scalar to bf16, Tensor.mul_ does not)."""
    for a, b in zip(*_run_paths(cls, dtype)):
        assert torch.equal(a, b), (cls.__name__, dtype, tuple(a.shape))


@pytest.mark.parametrize("cls", NS_FAMILY)
def test_foreach_and_per_tensor_paths_differ_only_by_batched_matmul_rounding(cls):
    """With Newton-Schulz, foreach=True batches same-shape matrices (baddbmm on a stack) where
    foreach=False multiplies one matrix at a time: equal up to float32 matmul rounding; the
    elementwise parts (momentum, AdamW, weight decay) are identical."""
    for a, b in zip(*_run_paths(cls, torch.float32)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if a.ndim == 1:  # AdamW-only parameters: bit-identical
            assert torch.equal(a, b)
