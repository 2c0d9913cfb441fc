"""The Hugging Face FSDP2 route, on CPU (2 gloo processes, one launch).

``Trainer(fsdp="full_shard", fsdp_config={"fsdp_version": 2})`` cannot shard on a CPU: under
torchrun ``TrainingArguments(use_cpu=True, fsdp=...)`` wraps the model in DDP and leaves the
parameters whole, and accelerate's ``Accelerator(cpu=True, fsdp_plugin=...)`` reports
``MULTI_CPU`` and ignores the plugin. So this test does on CPU what that route does to a model and
to our optimizer (the GPU run of the real Trainer is ``scripts/gpu_fsdp2_hf.py``):

* ``optimizer_cls_and_kwargs`` route (the one the Trainer takes under FSDP): the Trainer builds the
  optimizer from the factory on the *unsharded* model (with FSDP2 it does not delay optimizer
  creation), then accelerate (``Accelerator._prepare_fsdp2``) applies ``fully_shard`` to each
  transformer block and to the model, and swaps every parameter in the optimizer's groups for its
  sharded DTensor (``fsdp2_switch_optimizer_parameters``, by parameter name).
* ``create_optimizer_and_scheduler`` route (a hand-written FSDP2 loop): the factory is called with
  the already sharded model.

On a tiny Llama built from a config (no download), each rank on half of the global batch: 4 steps
equal one process on the whole batch (relative to the parameter change, <= 1e-4), the optimizer
state per rank is about half of one process's (no whole-size state left behind by the swap), and a
sharded save / load with ``torch.distributed.checkpoint`` into freshly built objects continues
exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from ._spawn import launch_once, read_results, write_result

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.ddp

SWAP_NAMES = ("adamw", "adan", "muon", "normuon", "frugal")
DIRECT_NAMES = ("adan", "muon")
STEPS, CKPT_AT, BATCH, SEQ = 4, 2, 4, 8
TOL = 1e-4


def _model():
    # Llama rather than GPT-2: GPT-2's attention key bias has an exactly zero gradient (softmax is
    # invariant to it), so Adam-type updates of it are float noise that no two runs share
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (BATCH, SEQ), generator=g)


def _args():
    from transformers import TrainingArguments

    return TrainingArguments(
        "unused",
        learning_rate=3e-3,
        weight_decay=0.01,
        max_steps=STEPS,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
    )


def _shard_like_accelerate(model, mesh):
    """accelerate's FSDP2 auto-wrap for a transformers model: ``fully_shard`` per transformer block
    (``_no_split_modules``: ``LlamaDecoderLayer``), then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _swap_as_accelerate(optimizer, old_named: dict, model) -> None:
    """What ``Accelerator._prepare_fsdp2`` does to an optimizer built before sharding: each
    parameter of its groups is replaced by the sharded parameter of the same name."""
    from accelerate.utils import fsdp2_switch_optimizer_parameters

    name_of = {id(p): n for n, p in old_named.items()}
    keys = {}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            key = object()
            keys[name_of[id(p)]] = key
            placeholder = torch.empty(1, dtype=p.dtype)
            placeholder.data_ptr = key  # accelerate keys its mapping the same way
            group["params"][i] = placeholder
    new_named = dict(model.named_parameters())
    mapping = {keys[n]: new_named[n] for n in keys}
    fsdp2_switch_optimizer_parameters(optimizer, mapping)


def _build(route, name, mesh):
    from lit_optim.integrations.hf import create_optimizer_and_scheduler, optimizer_cls_and_kwargs

    model = _model()
    if mesh is None:  # one process: the Trainer's route without FSDP
        cls, kw = optimizer_cls_and_kwargs(name, _args())
        return model, cls()(model, **kw)
    if route == "swap":
        cls, kw = optimizer_cls_and_kwargs(name, _args())
        old = dict(model.named_parameters())
        opt = cls()(model, **kw)
        _shard_like_accelerate(model, mesh)
        _swap_as_accelerate(opt, old, model)
        return model, opt
    _shard_like_accelerate(model, mesh)
    opt, _sched = create_optimizer_and_scheduler(model, name, _args())
    return model, opt


def _train(model, opt, ids, steps):
    for _ in steps:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from lit_optim.optim import optimizer_state_bytes

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    ids = _data()
    per = BATCH // 2
    mine = ids[rank * per : (rank + 1) * per]
    cases = [("swap", n) for n in SWAP_NAMES] + [("direct", n) for n in DIRECT_NAMES]
    for route, name in cases:
        res: dict = {}
        try:
            ref_model, ref_opt = _build(route, name, None)
            init = [_full(p) for p in ref_model.parameters()]
            _train(ref_model, ref_opt, ids, range(STEPS))
            res["bytes_one"] = optimizer_state_bytes(ref_opt)
            ref = [_full(p) for p in ref_model.parameters()]

            model, opt = _build(route, name, mesh)
            _train(model, opt, mine, range(CKPT_AT))
            res["bytes_rank"] = optimizer_state_bytes(opt)
            ckpt = os.path.join(out, f"{route}_{name}")
            dcp.save(
                {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                checkpoint_id=ckpt,
            )
            _train(model, opt, mine, range(CKPT_AT, STEPS))
            got = [_full(p) for p in model.parameters()]
            change = max(float((r - i).abs().max()) for r, i in zip(ref, init))
            res["rel"] = max(float((a - b).abs().max()) for a, b in zip(got, ref)) / change

            torch.manual_seed(5)
            model2, opt2 = _build(route, name, mesh)
            sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model2, sd["model"])
            set_optimizer_state_dict(model2, opt2, sd["optim"])
            _train(model2, opt2, mine, range(CKPT_AT, STEPS))
            res["resume_diff"] = max(float((_full(a) - b).abs().max()) for a, b in zip(model2.parameters(), got))
        except Exception as e:  # noqa: BLE001 - reported per case
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
        write_result(out, rank, f"{route}_{name}", res)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp2_hf"))
    error = launch_once(_worker, out, timeout=600)
    return [read_results(out, r) for r in (0, 1)], error


CASES = [f"swap_{n}" for n in SWAP_NAMES] + [f"direct_{n}" for n in DIRECT_NAMES]


@pytest.mark.parametrize("key", CASES)
def test_hf_fsdp2_route(launched, key):
    results, error = launched
    if key not in results[0] or key not in results[1]:
        pytest.fail(f"{key}: no result from the 2-process launch" + (f"; the launch failed:\n{error}" if error else ""))
    for res in (results[0][key], results[1][key]):
        assert "error" not in res, f"{key}: {res['error']}"
        assert res["rel"] <= TOL, f"{key}: FSDP2 differs from one process by {res['rel']:.3g} of the parameter change"
        assert res["bytes_rank"] <= 0.6 * res["bytes_one"], (
            f"{key}: {res['bytes_rank']} optimizer-state bytes per rank vs {res['bytes_one']} in one process"
        )
        assert res["resume_diff"] == 0.0, f"{key}: resumed run ends {res['resume_diff']:.3g} away"


@pytest.mark.parametrize("name", ["adan", "muon", "frugal", "sophia"])
def test_swapped_parameters_get_fresh_state(name):
    """One process: the parameters of an optimizer's groups replaced after construction (what
    accelerate does under FSDP2) get their own state and the state of the replaced ones is dropped,
    so that ``state_dict`` works and no whole-size state stays alive."""
    import lit_optim

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    opt = lit_optim.create_optimizer(model, name)
    old = {id(p) for p in model.parameters()}
    new = {id(p): torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    for group in opt.param_groups:
        group["params"] = [new[id(p)] for p in group["params"]]
    sd = opt.state_dict()
    assert len(sd["state"]) == len(new)
    assert not any(id(k) in old for k in opt.state)
    for p in new.values():
        p.grad = torch.ones_like(p)
    if name == "sophia":
        opt.update_hessian([torch.ones_like(p) for p in opt.hessian_params()])
    opt.step()
    assert set(map(id, opt.state)) == set(map(id, new.values()))
