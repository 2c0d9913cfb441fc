"""FRUGAL, SubsetNormAdam and DCTLowRank beyond the shared table: the projection maths, memory
accounting, subspace refresh rules, parameter groups, checkpoints and a small real model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.functional import dct, lowrank, subset
from lit_optim.optim import FRUGAL, DCTLowRank, SubsetNormAdam, lowrank_groups, optimizer_state_bytes

from .table.memory_reduced import dct_matrix, ref_dct, ref_frugal, ref_subset_norm

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize("d", [1, 5, 16])
def test_dct_basis_is_the_orthonormal_dct_ii(d):
    q = dct.dct_basis(d, F64)
    torch.testing.assert_close(q, dct_matrix(d), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.t() @ q, torch.eye(d, dtype=F64), atol=1e-12, rtol=0)
    assert dct.dct_basis(d, F64) is q  # built once, shared
    scipy_fft = pytest.importorskip("scipy.fft")
    # scipy's orthonormal DCT-II of x is Q^T x
    x = torch.randn(d, 3, generator=_gen(), dtype=F64)
    torch.testing.assert_close(torch.from_numpy(scipy_fft.dct(x.numpy(), type=2, norm="ortho", axis=0)), q.t() @ x)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_indices_find_the_basis_vectors_the_gradient_lives_in(side):
    d, r = 12, 3
    q = dct.dct_basis(d, F64)
    chosen = torch.tensor([2, 5, 9])
    coef = torch.randn(r, 20, generator=_gen(1), dtype=F64) + 3.0
    g = q[:, chosen] @ coef if side == "left" else (q[:, chosen] @ coef).t()
    g = g + 1e-3 * torch.randn(g.shape, generator=_gen(2), dtype=F64)
    idx, proj = dct.dct_indices(g, r, side)
    assert idx.dtype == torch.int64 and idx.tolist() == chosen.tolist()
    expected = q[:, idx].t() @ g if side == "left" else g @ q[:, idx]
    torch.testing.assert_close(proj, expected)
    with pytest.raises(ValueError, match="norm must be 1 or 2, got 3"):
        dct.dct_indices(g, r, side, norm=3)
    with pytest.raises(ValueError, match="d must be an integer >= 1, got 0"):
        dct.dct_basis(0)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_svd_basis_spans_the_top_singular_subspace(shape):
    m, n = shape
    side = lowrank.projection_side(m, n)
    g = torch.randn(shape, generator=_gen(), dtype=F64)
    p = lowrank.svd_basis(g, 3, side)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    ref = u[:, :3] if side == "left" else vh[:3].t()
    torch.testing.assert_close(p @ p.t(), ref @ ref.t(), atol=1e-10, rtol=0)
    torch.testing.assert_close(p.t() @ p, torch.eye(3, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(lowrank.svd_basis(-g, 3, side), p)  # sign-fixed: maximize-safe
    assert lowrank.svd_basis(g.float(), 3, side).dtype == torch.float32


def test_random_rules_are_functions_of_their_seed_keys():
    b1 = lowrank.random_basis(8, 3, lowrank.seeded_generator(0, 4, 1), F64, "cpu")
    b2 = lowrank.random_basis(8, 3, lowrank.seeded_generator(0, 4, 1), F64, "cpu")
    b3 = lowrank.random_basis(8, 3, lowrank.seeded_generator(0, 4, 2), F64, "cpu")
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    torch.testing.assert_close(b1.t() @ b1, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    i1 = lowrank.random_indices(50, 7, lowrank.seeded_generator(3), "cpu")
    assert torch.equal(i1, lowrank.random_indices(50, 7, lowrank.seeded_generator(3), "cpu"))
    assert i1.tolist() == sorted(set(i1.tolist())) and len(i1) == 7 and int(i1.max()) < 50


@pytest.mark.parametrize("shape", [(4, 9), (9, 4)])
@pytest.mark.parametrize("kind", ["dense", "index"])
def test_project_and_back_agree_with_explicit_matrices(shape, kind):
    m, n = shape
    side = lowrank.projection_side(m, n)
    d = min(m, n)
    g = torch.randn(shape, generator=_gen(), dtype=F64)
    if kind == "dense":
        basis = lowrank.random_basis(d, 2, _gen(5), F64, "cpu")
        P = basis
    else:
        basis = torch.tensor([0, 3])
        P = torch.eye(d, dtype=F64)[:, basis]
    low = lowrank.project(g, basis, side)
    torch.testing.assert_close(low, P.t() @ g if side == "left" else g @ P)
    x = torch.randn(low.shape, generator=_gen(6), dtype=F64)
    back = P @ x if side == "left" else x @ P.t()
    torch.testing.assert_close(lowrank.project_back(x, basis, side, m, n), back)
    out = g.clone()
    lowrank.add_back_(out, x, basis, side, alpha=-0.5)
    torch.testing.assert_close(out, g - 0.5 * back)


def test_topk_indices_and_rank_resolution():
    g = torch.zeros(5, 8)
    g[1] = 3.0
    g[4] = 2.0
    g[0] = 1.0
    assert lowrank.topk_indices(g, 2, "left").tolist() == [1, 4]
    assert lowrank.topk_indices(g.t(), 2, "right").tolist() == [1, 4]
    assert lowrank.resolve_rank(0.25, 512) == 128
    assert lowrank.resolve_rank(0.25, 5) == 2
    assert lowrank.resolve_rank(1000, 64) == 64
    assert lowrank.resolve_rank(0.01, 3) == 1
    assert lowrank.matrix_shape((3, 2, 2, 2)) == (3, 8)


def test_subset_sq_mean_and_sum():
    g = torch.randn(3, 5, generator=_gen(), dtype=F64)
    torch.testing.assert_close(subset.subset_sq(g, "sum"), (g**2).sum(0, keepdim=True))
    torch.testing.assert_close(subset.subset_sq(g, "mean"), (g**2).mean(0, keepdim=True))
    torch.testing.assert_close(subset.subset_sq(g.t(), "mean"), (g.t() ** 2).mean(1, keepdim=True))
    assert subset.subset_shape(3, 5) == (1, 5) and subset.subset_shape(5, 3) == (5, 1)
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum'\], got 'max'"):
        subset.subset_sq(g, "max")


# ----------------------------------------------------------------------------- update rules


def _run(cls, p0, grads, kw, foreach=True):
    p = nn.Parameter(p0.clone())
    opt = cls([p], foreach=foreach, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


REFS = [
    (FRUGAL, ref_frugal, {"projection": "svd", "lr": 0.05, "rank": 2, "update_proj_gap": 2, "weight_decay": 0.1}),
    (FRUGAL, ref_frugal, {"projection": "svd", "lr": 0.05, "rank": 3, "update_proj_gap": 3, "state_free": "sgd",
                          "state_free_lr_scale": 0.3}),
    (SubsetNormAdam, ref_subset_norm, {"projection": "svd", "lr": 0.05, "rank": 2, "update_proj_gap": 2,
                                       "weight_decay": 0.1}),
    (SubsetNormAdam, ref_subset_norm, {"projection": "svd", "lr": 0.05, "rank": 1, "update_proj_gap": 3,
                                       "subset_reduction": "sum", "adagrad": True,
                                       "betas": (0.8, 0.999)}),
    (DCTLowRank, ref_dct, {"lr": 0.05, "rank": 2, "update_proj_gap": 2}),
    (DCTLowRank, ref_dct, {"lr": 0.05, "rank": 3, "update_proj_gap": 2, "on_refresh": "reset", "dct_norm": 2}),
    (DCTLowRank, ref_dct, {"lr": 0.05, "rank": 3, "update_proj_gap": 3, "on_refresh": "keep"}),
]


@pytest.mark.parametrize("shape", [(4, 7), (7, 4)])
@pytest.mark.parametrize("cls,ref,kw", REFS, ids=lambda v: getattr(v, "__name__", ""))
def test_update_rule_on_both_sides_over_refreshes(cls, ref, kw, shape):
    """Seven steps cross several subspace refreshes, on a wide and a tall matrix."""
    torch.manual_seed(7)
    p0 = torch.randn(shape, dtype=F64)
    grads = [torch.randn(shape, dtype=F64) for _ in range(7)]
    expected = ref(p0, grads, kw)
    for foreach in (True, False):
        got, _ = _run(cls, p0, grads, kw, foreach)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_subset_norm_without_subspace_momentum_is_adam_sn():
    torch.manual_seed(0)
    p0 = torch.randn(4, 6, dtype=F64)
    grads = [torch.randn(4, 6, dtype=F64) for _ in range(4)]
    lr, b1, b2, eps = 0.02, 0.9, 0.999, 1e-8
    p, m, v = p0.clone(), torch.zeros(4, 6, dtype=F64), torch.zeros(1, 6, dtype=F64)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g**2).mean(0, keepdim=True)
        p = p - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    got, _ = _run(SubsetNormAdam, p0, grads, {"lr": lr, "subspace_momentum": False})
    torch.testing.assert_close(got, p, atol=1e-12, rtol=0)


def test_frugal_coordinate_projection_splits_the_gradient_exactly():
    """randk/topk: the selected rows get Adam, the others exactly signSGD."""
    torch.manual_seed(0)
    p0 = torch.randn(6, 10, dtype=F64)
    g = torch.randn(6, 10, dtype=F64)
    g[2] *= 10.0
    g[5] *= 8.0
    got, opt = _run(FRUGAL, p0, [g], {"projection": "topk", "rank": 2, "lr": 0.1})
    idx = opt.state[opt.param_groups[0]["params"][0]]["indices"].tolist()
    assert idx == [2, 5]
    expected = p0 - 0.1 * torch.sign(g)
    expected[idx] = p0[idx] - 0.1 * torch.sign(g[idx]) * (1 / (1 + 1e-8 / g[idx].abs()))  # Adam's first step
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_frugal_blockwise_keeps_one_block_of_state_at_a_time():
    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(8, 8)) for _ in range(4)]
    vec = nn.Parameter(torch.randn(8))
    opt = FRUGAL(mats + [vec], projection="blockwise", rank=0.25, update_proj_gap=2, lr=0.01)
    active_seen = []
    for step in range(1, 9):
        for p in mats + [vec]:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in mats]
        opt.step()
        with_state = [i for i, p in enumerate(mats) if "exp_avg" in opt.state[p]]
        assert len(with_state) == 1, with_state
        assert "exp_avg" in opt.state[vec]
        active_seen.append(with_state[0])
        # inactive matrices moved by exactly lr * sign(grad)
        for i, (p, b) in enumerate(zip(mats, before)):
            if i not in with_state:
                torch.testing.assert_close(p.detach(), b - 0.01 * torch.sign(p.grad))
    assert active_seen == [0, 0, 1, 1, 2, 2, 3, 3]
    assert optimizer_state_bytes(opt) == (2 * 64 + 2 * 8) * 4


def test_callable_projection_dense_and_index():
    torch.manual_seed(0)
    p0 = torch.randn(5, 9, dtype=F64)
    grads = [torch.randn(5, 9, dtype=F64) for _ in range(3)]

    def first_rows(g, r, side):
        return torch.arange(r)

    def svd_rule(g, r, side):
        return lowrank.svd_basis(g, r, side)

    ref = ref_frugal(p0, grads, {"projection": "svd", "lr": 0.05, "rank": 2, "update_proj_gap": 2})
    got, _ = _run(FRUGAL, p0, grads, {"projection": svd_rule, "lr": 0.05, "rank": 2, "update_proj_gap": 2})
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    got, opt = _run(SubsetNormAdam, p0, grads, {"projection": first_rows, "rank": 2})
    assert opt.state[opt.param_groups[0]["params"][0]]["indices"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"returned a basis of shape \(4, 2\), expected \(5, 2\)"):
        _run(FRUGAL, p0, grads, {"projection": lambda g, r, s: torch.zeros(4, r, dtype=F64), "rank": 2})
    with pytest.raises(TypeError, match="must return a tensor"):
        _run(FRUGAL, p0, grads, {"projection": lambda g, r, s: [0, 1], "rank": 2})


def test_non_contiguous_conv_kernel_matches_contiguous():
    torch.manual_seed(0)
    base = torch.randn(3, 4, 2, 5, dtype=F64)
    grads = [torch.randn(3, 4, 2, 5, dtype=F64) for _ in range(3)]
    for cls, kw in [(FRUGAL, {"projection": "svd"}), (SubsetNormAdam, {"projection": "svd"}), (SubsetNormAdam, {}),
                    (DCTLowRank, {"update_proj_gap": 2})]:
        a = nn.Parameter(base.clone())
        storage = base.permute(0, 2, 1, 3).contiguous()
        b = nn.Parameter(storage.permute(0, 2, 1, 3))  # same values, non-contiguous
        assert not b.is_contiguous()
        oa, ob = cls([a], lr=0.05, **kw), cls([b], lr=0.05, **kw)
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_state_bytes_are_those_of_the_low_rank_method(shape):
    """Counted from optimizer.state: rank 16 of d = 64 (d/4)."""
    m, n = shape
    big, r = max(m, n), 16
    cases = [
        (FRUGAL, {}, 2 * r * big * 4 + r * 8),  # m, v in the subspace + int64 indices
        (FRUGAL, {"projection": "svd"}, 2 * r * big * 4 + 64 * r * 4),  # + the (d, r) basis
        (SubsetNormAdam, {}, r * big * 4 + big * 4 + r * 8),  # momentum + one entry per subset + indices
        (SubsetNormAdam, {"projection": "svd"}, r * big * 4 + big * 4 + 64 * r * 4),  # + the (d, r) basis
        (DCTLowRank, {}, 2 * r * big * 4 + r * 8 + r * 8),  # + int64 step count per direction ("rotate")
    ]
    adam = 2 * m * n * 4
    for cls, kw, expected in cases:
        p = nn.Parameter(torch.randn(shape))
        opt = cls([p], rank=r, **kw)
        p.grad = torch.randn(shape)
        opt.step()
        assert optimizer_state_bytes(opt) == expected, (cls.__name__, kw)
        assert expected <= 0.3 * adam


def test_index_tensors_survive_a_bfloat16_checkpoint():
    """torch casts state tensors to the parameter dtype on load; indices above 256 would not
    survive bfloat16, so they are restored as int64."""
    p = nn.Parameter(torch.randn(600, 1000, dtype=torch.bfloat16))
    opt = FRUGAL([p], rank=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    idx = opt.state[p]["indices"].clone()
    assert int(idx.max()) > 256
    sd = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    opt2 = FRUGAL([q], rank=0.5)
    opt2.load_state_dict(sd)
    assert opt2.state[q]["indices"].dtype == torch.int64
    assert torch.equal(opt2.state[q]["indices"], idx)
    assert opt2.state[q]["exp_avg"].dtype == torch.bfloat16
    d = DCTLowRank([q], rank=0.5)
    q.grad = torch.randn_like(q)
    d.step()
    sd = copy.deepcopy(d.state_dict())
    d2 = DCTLowRank([q], rank=0.5)
    d2.load_state_dict(sd)
    assert torch.equal(d2.state[q]["dct_indices"], d.state[q]["dct_indices"])


# ----------------------------------------------------------------------------- groups and factory


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)


def _groups_of(opt):
    return {id(p): g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name,cls", [("frugal", FRUGAL), ("subset_norm", SubsetNormAdam), ("dct_lowrank", DCTLowRank)])
def test_create_optimizer_projects_every_matrix(name, cls):
    net = _Net()
    opt = lit_optim.create_optimizer(net, name, weight_decay=0.1)
    assert isinstance(opt, cls)
    g = _groups_of(opt)
    for p in (net.emb.weight, net.fc.weight, net.head.weight):
        assert g[id(p)]["project"] is True and g[id(p)]["weight_decay"] == 0.1
    for p in (net.fc.bias, net.norm.weight, net.norm.bias, net.head.bias):
        assert g[id(p)]["project"] is False and g[id(p)]["weight_decay"] == 0.0
    x = torch.randint(0, 50, (4, 3))
    net.head(net.norm(net.fc(net.emb(x)))).sum().backward()
    opt.step()
    assert "exp_avg_sq" in opt.state[net.fc.bias] and opt.state[net.fc.bias]["exp_avg_sq"].shape == (32,)
    assert opt.state[net.fc.weight]["exp_avg"].numel() < net.fc.weight.numel()


def test_lowrank_groups_paper_split_and_no_weight_decay():
    net = _Net()
    net.no_weight_decay = lambda: {"fc.weight"}
    groups = lowrank_groups(net, 0.05, project_embeddings=False)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(net.emb.weight)]["project"] is False and by_id[id(net.emb.weight)]["weight_decay"] == 0.05
    assert by_id[id(net.head.weight)]["project"] is False
    assert by_id[id(net.fc.weight)]["project"] is True and by_id[id(net.fc.weight)]["weight_decay"] == 0.0
    opt = FRUGAL(groups)
    x = torch.randint(0, 50, (4, 3))
    net.head(net.norm(net.fc(net.emb(x)))).sum().backward()
    opt.step()
    assert opt.state[net.emb.weight]["exp_avg"].shape == net.emb.weight.shape  # full-state AdamW
    assert "indices" not in opt.state[net.emb.weight]
    assert lowrank_groups(groups) == groups


# ----------------------------------------------------------------------------- a real model


@pytest.mark.parametrize("name", ["frugal", "subset_norm", "dct_lowrank"])
def test_trains_a_tiny_gpt(name):
    from lit_optim.tasks import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = lit_optim.create_optimizer(model, name, lr=3e-3, update_proj_gap=10)
    data = torch.randint(0, 32, (8, 17), generator=_gen())
    data[:, 1::2] = (data[:, 0::2][:, :8] + 1) % 32  # a learnable pattern
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(
    "cls,kw",
    [(DCTLowRank, {}), (FRUGAL, {"projection": "svd"}), (SubsetNormAdam, {"projection": "svd"}),
     (SubsetNormAdam, {"projection": "dct"})],
)
def test_bfloat16_projection_products_track_float32(cls, kw):
    """proj_dtype=bfloat16 runs only the matrix products in bfloat16: the weights stay float32 and
    follow the float32 run to bfloat16 rounding of the products."""
    torch.manual_seed(0)
    base = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(6)]
    runs = {}
    for dt in (None, "bfloat16"):
        p = nn.Parameter(base.clone())
        opt = cls([p], lr=1e-2, rank=6, update_proj_gap=3, proj_dtype=dt, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert p.dtype == torch.float32
        assert all(t.dtype != torch.bfloat16 for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        runs[dt] = p.detach().clone()
    moved = (runs[None] - base).norm()
    assert moved > 0
    # FRUGAL's signSGD residual turns bfloat16 rounding of near-zero entries into full-size sign
    # flips, so its runs drift a little more than the others (~5% of the distance moved here)
    assert (runs["bfloat16"] - runs[None]).norm() < 0.1 * moved
    # a float64 check of the same path would be exact; bfloat16 is not
    assert not torch.equal(runs["bfloat16"], runs[None])


# ----------------------------------------------------------------------------- issue 15


def _delta_of_one_step(opt, p, g):
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    return p.detach() - before


def test_dct_reset_restarts_the_bias_correction_with_the_moments():
    """Item 2: after a reset the step is a fresh Adam step (the count restarts as FRUGAL's), not
    0.5x-3x of it as with the global step in the bias correction."""
    torch.manual_seed(0)
    grads = [torch.randn(6, 10, dtype=F64) for _ in range(4)]
    p = nn.Parameter(torch.randn(6, 10, dtype=F64))
    opt = DCTLowRank([p], lr=0.1, rank=2, update_proj_gap=3, on_refresh="reset")
    for g in grads[:3]:
        _delta_of_one_step(opt, p, g)
    after_reset = _delta_of_one_step(opt, p, grads[3])  # step 4 refreshes and resets
    q = nn.Parameter(torch.zeros(6, 10, dtype=F64))
    fresh = _delta_of_one_step(DCTLowRank([q], lr=0.1, rank=2, update_proj_gap=3, on_refresh="reset"), q, grads[3])
    torch.testing.assert_close(after_reset, fresh, atol=1e-14, rtol=0)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_dct_rotate_new_direction_takes_a_fresh_adam_step(shape):
    """Item 2, "rotate": a DCT direction selected for the first time at a refresh gets a fresh Adam
    step (its own step count), while a kept direction continues its own count."""
    m, n = shape
    left = m <= n
    d, big = min(m, n), max(m, n)
    Q = dct_matrix(d)
    gen = _gen(1)

    def aligned(j, scale):  # a gradient in the span of DCT vector j only
        a = torch.randn(big, generator=gen, dtype=F64) * scale
        return torch.outer(Q[:, j], a) if left else torch.outer(a, Q[:, j])

    p = nn.Parameter(torch.zeros(shape, dtype=F64))
    opt = DCTLowRank([p], lr=0.1, rank=1, update_proj_gap=3)
    for _ in range(3):
        _delta_of_one_step(opt, p, aligned(0, 1.0))
    g4 = aligned(2, 3.0)
    step4 = _delta_of_one_step(opt, p, g4)  # refresh: direction 2 replaces direction 0
    assert opt.state[p]["dct_indices"].tolist() == [2]
    assert opt.state[p]["dir_step"].tolist() == [1]
    q = nn.Parameter(torch.zeros(shape, dtype=F64))
    fresh = _delta_of_one_step(DCTLowRank([q], lr=0.1, rank=1, update_proj_gap=3), q, g4)
    torch.testing.assert_close(step4, fresh, atol=1e-14, rtol=0)
    # Adam's first step: lr * sign of the projected gradient, in the direction of DCT vector 2
    r4 = Q[:, 2] @ g4 if left else g4 @ Q[:, 2]
    expected = -0.1 * (torch.outer(Q[:, 2], torch.sign(r4)) if left else torch.outer(torch.sign(r4), Q[:, 2]))
    torch.testing.assert_close(step4, expected, atol=1e-8, rtol=0)
    # a kept direction continues its count: refreshing onto the same vector again keeps it
    _delta_of_one_step(opt, p, aligned(2, 1.0))
    _delta_of_one_step(opt, p, aligned(2, 1.0))
    _delta_of_one_step(opt, p, aligned(2, 1.0))  # step 7 refreshes, vector 2 is kept
    assert opt.state[p]["dir_step"].tolist() == [4]


def test_subset_norm_betas_follow_torch_and_adagrad_is_explicit():
    """Item 10: betas[1] = 1.0 is refused like everywhere else, with a pointer to adagrad=True,
    which gives the accumulation that betas[1] = 1.0 used to select."""
    ps = [nn.Parameter(torch.randn(4, 6, dtype=F64))]
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0 .*adagrad=True"):
        SubsetNormAdam(ps, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0"):
        SubsetNormAdam([{"params": ps, "betas": (0.9, 1.0)}])
    torch.manual_seed(0)
    p0 = torch.randn(4, 6, dtype=F64)
    grads = [torch.randn(4, 6, dtype=F64) for _ in range(3)]
    lr, eps = 0.05, 1e-8
    p, v = p0.clone(), torch.zeros(1, 6, dtype=F64)
    for g in grads:
        v = v + (g**2).mean(0, keepdim=True)
        p = p - lr * g / (v.sqrt() + eps)  # beta1 = 0: no momentum
    got, _ = _run(SubsetNormAdam, p0, grads, {"lr": lr, "betas": (0.0, 0.5), "adagrad": True, "subspace_momentum": False})
    torch.testing.assert_close(got, p, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cls,kw",
    [(FRUGAL, {}), (FRUGAL, {"projection": "svd", "state_full": "sgdm"}), (FRUGAL, {"projection": "blockwise"}),
     (SubsetNormAdam, {}), (SubsetNormAdam, {"subspace_momentum": False}), (DCTLowRank, {}),
     (DCTLowRank, {"on_refresh": "keep"})],
)
def test_tensor_lr_in_a_group_works_on_the_multi_tensor_path(cls, kw):
    """Item 22: a 0-d tensor lr put into a group after construction (as a scheduler or a user
    might, bypassing the group checks) runs on the foreach path and equals the float lr."""
    torch.manual_seed(0)
    shapes = [(5, 8), (8, 5), (8,)]
    base = [torch.randn(s, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(3)]
    out = []
    for lr in (0.01, torch.tensor(0.01, dtype=F64)):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = cls(ps, lr=0.01, weight_decay=0.1, update_proj_gap=2, **kw)
        opt.param_groups[0]["lr"] = lr
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-15, rtol=0)


@pytest.mark.parametrize("cls", [FRUGAL, SubsetNormAdam, DCTLowRank])
def test_eps_zero_is_refused_in_the_constructor_and_in_group_dicts(cls):
    """Item 7: with eps=0 a coordinate or direction whose gradient has always been zero divided
    0 by 0 and wrote NaN into the weight."""
    p = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\), got 0.*divide 0 by 0"):
        cls([p], eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be in \(0, inf\), got 0.*divide 0 by 0"):
        cls([{"params": [p], "eps": 0.0}])
