"""WeightAveragingCallback / MultiEMA / DiWA averaging in real (CPU) Lightning runs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lit_optim.callbacks import WeightAveragingCallback, average_checkpoints, extract_average
from lit_optim.functional import MultiEMA, average_state_dicts, init_fingerprint

from ..helpers import TinyClassifier, classification_data, fit_resume_compare, flat_params, quiet_trainer


# ----------------------------------------------------------------------------- a model with known updates

C = torch.tensor([1.0, 2.0, -3.0])
W0 = torch.tensor([0.5, -1.0, 2.0])
LR = 0.1


class KnownUpdates(L.LightningModule):
    """Loss (w * c).sum(): constant gradient c, so plain SGD gives w_t = w_0 - t * lr * c."""

    def __init__(self, batches: int = 12):
        super().__init__()
        self.w = nn.Parameter(W0.clone())
        self.batches = batches

    def training_step(self, batch, batch_idx):
        return (self.w * C).sum() + 0.0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(torch.zeros(self.batches, 1), batch_size=1)


def w_after(t: int) -> torch.Tensor:
    return W0.double() - t * LR * C.double()


def ema_closed_form(decay: float, steps: list[int]) -> torch.Tensor:
    """EMA over the weights after the given optimizer steps (first one copied)."""
    avg = w_after(steps[0])
    for t in steps[1:]:
        avg = decay * avg + (1 - decay) * w_after(t)
    return avg


def test_ema_equals_closed_form_for_several_decays_under_gradient_accumulation():
    cb = WeightAveragingCallback(decays=(0.5, 0.9, 0.99), write_at_end=False, dtype=torch.float64, device="cpu")
    model = KnownUpdates(batches=12)
    quiet_trainer(max_epochs=1, callbacks=[cb], accumulate_grad_batches=2).fit(model)
    ema = cb.averager
    assert ema.n_averaged == 6  # once per optimizer step, not per micro-batch
    torch.testing.assert_close(model.w.detach().double(), w_after(6))
    for k, decay in enumerate((0.5, 0.9, 0.99)):
        torch.testing.assert_close(ema.averages[k][0], ema_closed_form(decay, [1, 2, 3, 4, 5, 6]), rtol=0, atol=1e-6)
        assert ema.averages[k][0].dtype == torch.float64 and ema.averages[k][0].device.type == "cpu"


def test_start_step_every_n_steps_and_uniform_average():
    cb = WeightAveragingCallback(decays=(0.8,), start_step=2, every_n_steps=3, write_at_end=False)
    swa = WeightAveragingCallback("uniform", start_step=1, write_at_end=True)
    model = KnownUpdates(batches=10)
    quiet_trainer(max_epochs=1, callbacks=[cb, swa]).fit(model)
    # zero-based step indices 2, 5, 8 -> weights after steps 3, 6, 9
    assert cb.averager.n_averaged == 3
    torch.testing.assert_close(cb.averager.averages[0][0].double(), ema_closed_form(0.8, [3, 6, 9]), atol=1e-6, rtol=0)
    mean = torch.stack([w_after(t) for t in range(2, 11)]).mean(0)
    torch.testing.assert_close(swa.averager.averages[0][0].double(), mean, atol=1e-6, rtol=0)
    # written at the end (the uniform callback runs last, so its average ends up in the model)
    torch.testing.assert_close(model.w.detach().double(), mean, atol=1e-6, rtol=0)


def test_every_n_epochs_updates_at_epoch_ends():
    cb = WeightAveragingCallback("uniform", every_n_epochs=2, write_at_end=False)
    model = KnownUpdates(batches=3)
    quiet_trainer(max_epochs=4, callbacks=[cb]).fit(model)
    assert cb.averager.n_averaged == 2  # after epochs 1 and 3 (zero-based), i.e. steps 6 and 12
    torch.testing.assert_close(cb.averager.averages[0][0].double(), (w_after(6) + w_after(12)) / 2, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- validation with every target


class AccClassifier(TinyClassifier):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.val_acc = MulticlassAccuracy(num_classes=4, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", F.cross_entropy(logits, y))


class CountValidationEnds(Callback):
    def __init__(self):
        self.ends = 0

    def on_validation_end(self, trainer, pl_module):
        self.ends += 0 if trainer.sanity_checking else 1


def _val_metrics(model):
    x, y = classification_data(32, seed=1).tensors
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_validation_with_every_average_and_the_raw_weights_in_one_epoch():
    L.seed_everything(0)
    cb = WeightAveragingCallback(decays=(0.9, 0.5), evaluate_with="both", write_at_end=False)
    counter = CountValidationEnds()
    stopper = EarlyStopping(monitor="val_loss", patience=100)
    model = AccClassifier(optimizer="adamw", opt_kwargs={"lr": 3e-2})
    trainer = quiet_trainer(max_epochs=3, callbacks=[cb, counter, stopper], num_sanity_val_steps=1)
    trainer.fit(model)
    m = trainer.callback_metrics
    assert {"val_loss", "val_acc", "val_loss/ema_0.5", "val_acc/ema_0.5", "val_loss/raw", "val_acc/raw"} <= set(m)
    # other callbacks see one validation per epoch, not one per evaluated average
    assert counter.ends == 3
    assert stopper.wait_count <= 3
    model.eval()
    loss, acc = _val_metrics(model)  # raw weights (write_at_end=False)
    assert m["val_loss/raw"].item() == pytest.approx(loss, abs=1e-6)
    assert m["val_acc/raw"].item() == pytest.approx(acc, abs=1e-6)
    for label, which in (("", 0), ("/ema_0.5", 1)):
        with cb.averager.swapped(which):
            loss, acc = _val_metrics(model)
        assert m[f"val_loss{label}"].item() == pytest.approx(loss, abs=1e-6)
        assert m[f"val_acc{label}"].item() == pytest.approx(acc, abs=1e-6)
    # the averages really differ from the raw weights, and the raw weights are back after validation
    assert m["val_loss"].item() != pytest.approx(m["val_loss/raw"].item(), abs=1e-7)
    assert cb.averager.swapped_in is None


# ----------------------------------------------------------------------------- BatchNorm buffers


class BNModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.seen_running_mean = []  # buffers seen inside validation_step

    def forward(self, x):
        return self.bn(self.lin(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.seen_running_mean.append(self.bn.running_mean.clone())
        self.log("val_out", self(x).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g) * 3 + 1), batch_size=6)

    def val_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4)), batch_size=6)


class RecordBuffers(Callback):
    def __init__(self):
        self.means = []
        self.counts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.means.append(pl_module.bn.running_mean.detach().clone().double())
        self.counts.append(int(pl_module.bn.num_batches_tracked))


def test_batchnorm_statistics_are_averaged_and_swapped_in():
    cb = WeightAveragingCallback(decays=(0.7,), write_at_end=False)
    rec = RecordBuffers()
    model = BNModel()
    quiet_trainer(max_epochs=2, callbacks=[cb, rec]).fit(model)
    ema = cb.averager
    i_mean = ema.names.index("bn.running_mean")
    i_count = ema.names.index("bn.num_batches_tracked")
    expected = rec.means[0]
    for m in rec.means[1:]:
        expected = 0.7 * expected + 0.3 * m
    torch.testing.assert_close(ema.averages[0][i_mean].double(), expected, atol=1e-6, rtol=0)
    assert int(ema.averages[0][i_count]) == rec.counts[-1] == 8  # integer buffer: latest value
    # inside validation the model ran with the averaged statistics
    torch.testing.assert_close(model.seen_running_mean[-1], ema.averages[0][i_mean])
    assert not torch.equal(model.bn.running_mean, ema.averages[0][i_mean])


# ----------------------------------------------------------------------------- resume, export, checkpoints


def test_resume_matches_a_run_that_never_stopped(tmp_path):
    made = []

    def callbacks():
        cb = WeightAveragingCallback(decays=(0.9, 0.99), evaluate_with="both", start_step=1)
        made.append(cb)
        return [cb]

    straight, resumed, _ = fit_resume_compare(
        lambda: TinyClassifier(optimizer="adamw"), tmp_path, callbacks_factory=callbacks
    )
    # written at the end: the primary average, identical bit for bit
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    a, _, c = made
    assert a.averager.n_averaged == c.averager.n_averaged == 15  # 16 steps, from step index 1
    for k in range(2):
        for x, y in zip(a.averager.averages[k], c.averager.averages[k]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the raw weights (kept aside after the write) are identical too
    for x, y in zip(a.averager.stashed(), c.averager.stashed()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_checkpoint_holds_raw_weights_and_every_average(tmp_path):
    L.seed_everything(0)
    cb = WeightAveragingCallback(decays=(0.9, 0.99))
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb])
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    raw = dict(zip(cb.averager.names, cb.averager.stashed()))
    torch.testing.assert_close(ckpt["state_dict"]["net.0.weight"], raw["net.0.weight"])
    # the model itself now holds the primary average (write_at_end)
    torch.testing.assert_close(model.net[0].weight.detach(), cb.averager.averages[0][0])
    for which, k in ((0.9, 0), (0.99, 1), ("ema_0.99", 1), (None, 0)):
        sd = extract_average(path, which)
        torch.testing.assert_close(sd["net.0.weight"], cb.averager.averages[k][0])
        assert set(sd) == set(model.state_dict())
    exported = cb.export(tmp_path / "ema.pt", which=0.99)
    fresh = TinyClassifier()
    fresh.load_state_dict(torch.load(tmp_path / "ema.pt"))
    x = torch.randn(5, 8)
    with cb.averager.swapped(1):
        torch.testing.assert_close(fresh(x), model(x))
    assert set(exported) == set(model.state_dict())
    with pytest.raises(ValueError, match="no average with decay 0.5"):
        extract_average(path, 0.5)


def test_average_with_nan_is_never_written_into_the_weights():
    model = nn.Linear(3, 2)
    ema = MultiEMA(model, decays=(0.9,))
    ema.update()
    ema.averages[0][0].fill_(float("nan"))
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        ema.copy_to(0)
    torch.testing.assert_close(model.weight.detach(), before)

    class Poison(Callback):
        def on_train_end(self, trainer, pl_module):
            pass

    cb = WeightAveragingCallback(decays=(0.9,))

    class PoisonBefore(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                cb.averager.averages[0][0].fill_(float("inf"))

    m = TinyClassifier()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        quiet_trainer(max_epochs=1, callbacks=[cb, PoisonBefore()], limit_val_batches=0).fit(m)
    assert torch.isfinite(flat_params(m)).all()


def test_multi_ema_swap_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    ema = MultiEMA(m, decays=(0.5,))
    ema.update()
    with torch.no_grad():
        m.emb.weight.add_(1.0)
    ema.update()
    sd = ema.averaged_state_dict(0)
    torch.testing.assert_close(sd["emb.weight"], sd["out.weight"])
    torch.testing.assert_close(sd["emb.weight"], m.emb.weight.detach() - 0.5)
    raw = m.emb.weight.detach().clone()
    ema.swap_in(0)
    assert ema.swapped_in == 0
    torch.testing.assert_close(m.out.weight.detach(), raw - 0.5)
    ema.swap_out()
    torch.testing.assert_close(m.emb.weight.detach(), raw)


def test_multi_ema_state_dict_round_trip_and_mismatch():
    m = nn.Linear(4, 2)
    a = MultiEMA(m, decays=(0.9, 0.99))
    for _ in range(3):
        with torch.no_grad():
            m.weight.mul_(1.1)
        a.update()
    b = MultiEMA(m, decays=(0.9, 0.99))
    b.load_state_dict(a.state_dict())
    assert b.n_averaged == 3
    for x, y in zip(a.averages[1], b.averages[1]):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="decays"):
        MultiEMA(m, decays=(0.9,)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="shape"):
        MultiEMA(nn.Linear(5, 2), decays=(0.9, 0.99)).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"kind": "polyak"}, ValueError, r"kind must be one of \['ema', 'uniform'\], got 'polyak'"),
        ({"decays": (0.9, 1.0)}, ValueError, r"decays\[1\] must be in \[0, 1\), got 1.0"),
        ({"decays": (-0.1,)}, ValueError, r"decays\[0\] must be in \[0, 1\), got -0.1"),
        ({"decays": ("0.9",)}, TypeError, r"decays\[0\] must be a float"),
        ({"decays": (0.9, 0.9)}, ValueError, "distinct"),
        ({"kind": "uniform", "decays": (0.9,)}, ValueError, "only used with kind='ema'"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be an integer >= 1, got 0"),
        ({"start_step": -1}, ValueError, "start_step must be an integer >= 0, got -1"),
        ({"every_n_epochs": 1.5}, TypeError, "every_n_epochs must be an integer"),
        ({"evaluate_with": "ema"}, ValueError, "evaluate_with must be one of"),
        ({"decays": (0.9,), "primary": 0.99}, ValueError, r"no average with decay 0.99; decays are \(0.9,\)"),
        ({"decays": (0.9,), "primary": 3}, ValueError, r"average index must be in \[0, 1\), got 3"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        WeightAveragingCallback(**kwargs)


# ----------------------------------------------------------------------------- DiWA


def _run(tmp_path, name, init_seed, data_seed, lr):
    L.seed_everything(init_seed)
    model = TinyClassifier(opt_kwargs={"lr": lr})
    model.train_dataloader = lambda: DataLoader(classification_data(64, seed=data_seed), batch_size=16, shuffle=False)
    cb = WeightAveragingCallback(decays=(0.9,))
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], limit_val_batches=0)
    trainer.fit(model)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_average_checkpoints_of_runs_from_one_initialization(tmp_path):
    paths = [_run(tmp_path, f"run{i}", 0, data_seed=i, lr=lr) for i, lr in enumerate((1e-3, 3e-3, 1e-2))]
    sds = [torch.load(p, weights_only=False)["state_dict"] for p in paths]
    avg = average_checkpoints(paths)
    for k in sds[0]:
        torch.testing.assert_close(avg[k], (sds[0][k] + sds[1][k] + sds[2][k]) / 3)
    weighted = average_checkpoints(paths, weights=[2, 0, 2])
    torch.testing.assert_close(weighted["net.0.weight"], (sds[0]["net.0.weight"] + sds[2]["net.0.weight"]) / 2)
    # DiWA over each run's moving average
    ema_avg = average_checkpoints(paths, use_average=0.9)
    emas = [extract_average(p, 0.9) for p in paths]
    torch.testing.assert_close(ema_avg["net.3.weight"], sum(e["net.3.weight"] for e in emas) / 3)
    # the averaged model loads into the architecture
    TinyClassifier().load_state_dict(avg)
    # plain state dicts (no fingerprints): the weight-similarity test accepts them
    average_checkpoints([dict(sd) for sd in sds])


def test_average_checkpoints_refuses_runs_without_a_shared_initialization(tmp_path):
    a = _run(tmp_path, "a", init_seed=0, data_seed=0, lr=1e-3)
    b = _run(tmp_path, "b", init_seed=1, data_seed=0, lr=1e-3)
    with pytest.raises(ValueError, match=r"b.ckpt and .*a.ckpt do not share an initialization.*net\.0\.weight"):
        average_checkpoints([a, b])
    # without fingerprints: the weight matrices of independent inits are nearly orthogonal
    sda = torch.load(a, weights_only=False)["state_dict"]
    sdb = torch.load(b, weights_only=False)["state_dict"]
    with pytest.raises(ValueError, match="cosine similarity of their weight matrices"):
        average_checkpoints([sda, sdb])
    average_checkpoints([sda, sdb], check_init=False)  # explicit opt-out
    # structure mismatch
    other = dict(sda)
    other["net.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"tensor 'net.0.weight' is \(3, 3\)"):
        average_state_dicts([sda, other])
    with pytest.raises(ValueError, match="missing"):
        average_state_dicts([sda, {k: v for k, v in sda.items() if k != "net.3.bias"}])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got \[1.0, -1.0\]"):
        average_checkpoints([a, a], weights=[1, -1])
    with pytest.raises(ValueError, match="one entry per run"):
        average_checkpoints([a, a], weights=[1])


def test_init_fingerprint_is_recorded_at_the_start_and_survives_resume(tmp_path):
    L.seed_everything(0)
    model = TinyClassifier()
    fp0 = init_fingerprint(model)
    cb = WeightAveragingCallback()
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], limit_val_batches=0)
    trainer.fit(model)
    assert cb.state_dict()["init_fingerprint"] == fp0
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    cb2 = WeightAveragingCallback()
    quiet_trainer(max_epochs=2, callbacks=[cb2], limit_val_batches=0).fit(
        TinyClassifier(), ckpt_path=tmp_path / "a.ckpt"
    )
    assert cb2.state_dict()["init_fingerprint"] == fp0
    assert math.isfinite(cb2.averager.averages[0][0].sum().item())


def test_primary_accepts_what_config_parsers_produce():
    """jsonargparse / YAML may turn an index into a float (0 -> 0.0): a whole-number float that is
    not a decay is an index; the default (None) is the first average."""
    decays = (0.9, 0.99)
    assert WeightAveragingCallback(decays=decays).primary == 0
    assert WeightAveragingCallback(decays=decays, primary=0.0).primary == 0
    assert WeightAveragingCallback(decays=decays, primary=1.0).primary == 1
    assert WeightAveragingCallback(decays=decays, primary=0.99).primary == 1
    assert WeightAveragingCallback(decays=(0.0, 0.5), primary=0.0).primary == 0  # a decay wins over an index
    assert WeightAveragingCallback(kind="uniform", primary=0.0).primary == 0
    with pytest.raises(ValueError, match=r"no average with decay 2.0 and no average index 2"):
        WeightAveragingCallback(decays=decays, primary=2.0)
