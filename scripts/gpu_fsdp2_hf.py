"""Hugging Face ``Trainer`` with FSDP2 and lit_optim optimizers, on a multi-GPU machine.

Not runnable on a CPU: there ``TrainingArguments(use_cpu=True, fsdp=...)`` under torchrun wraps
the model in DDP and leaves the parameters whole, and accelerate's ``Accelerator(cpu=True,
fsdp_plugin=...)`` reports ``MULTI_CPU`` and ignores the plugin. (What this route does to a model
and an optimizer is tested on CPU by tests/distributed/test_fsdp2_hf.py, which shards and swaps
parameters the way accelerate does.) Run it with one process per GPU::

    torchrun --nproc_per_node=2 scripts/gpu_fsdp2_hf.py
    torchrun --nproc_per_node=4 scripts/gpu_fsdp2_hf.py --optimizers muon,normuon --steps 16

For each optimizer (default: adamw, adan, muon, normuon, frugal, lion) the script

1. trains a small Llama built from a config (no download) with
   ``Trainer(args=TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2, ...}),
   optimizer_cls_and_kwargs=lit_optim.integrations.hf.optimizer_cls_and_kwargs(name, args))``
   for ``--steps`` steps (float32, no shuffling, each rank on its share of every global batch),
   saving a sharded checkpoint (``SHARDED_STATE_DICT``) half way;
2. checks that the parameters and the optimizer state are DTensors sharded over the ranks
   (optimizer-state bytes per rank about 1/N of one process's);
3. resumes a fresh Trainer from the half-way checkpoint and compares its final parameters with
   the uninterrupted run (they must be equal);
4. on rank 0, trains one process (a plain loop, no FSDP) on the whole global batches in the same
   order and reports the relative difference of the final parameters (target <= 1e-4 of the
   parameter change in float32).

It prints a Markdown table on rank 0 and exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

DEFAULT = "adamw,adan,muon,normuon,frugal,lion"


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 512, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_cls():
    from transformers import Trainer

    class InOrder(Trainer):
        """No shuffling: global batch t is samples [t*N*B, (t+1)*N*B) of the dataset."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder


def _args(out: str, steps: int, batch: int, save_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        seed=0,
        dataloader_drop_last=True,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    )


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()


def _state_bytes(optimizer) -> int:
    from lit_optim.integrations.hf import unwrap_optimizer
    from lit_optim.optim import optimizer_state_bytes

    return optimizer_state_bytes(unwrap_optimizer(optimizer))


def _one(name: str, a, world: int, rank: int, root: str) -> dict:
    from lit_optim.integrations.hf import optimizer_cls_and_kwargs

    out = os.path.join(root, name)
    data = _Tokens(a.steps * a.batch * world, a.seq)
    args = _args(out, a.steps, a.batch, a.steps // 2)
    trainer = _trainer_cls()(
        model=_model(), args=args, train_dataset=data, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(name, args)
    )
    trainer.train()
    params = list(trainer.model.parameters())
    sharded = all(type(p).__name__ == "DTensor" for p in params)
    bytes_rank = _state_bytes(trainer.optimizer)
    final = [_full(p) for p in params]  # collective
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    args2 = _args(out, a.steps, a.batch, a.steps // 2)
    resumed = _trainer_cls()(
        model=_model(seed=7),
        args=args2,
        train_dataset=data,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(name, args2),
    )
    resumed.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{a.steps // 2}"))
    final2 = [_full(p) for p in resumed.model.parameters()]
    resume_diff = max(float((x - y).abs().max()) for x, y in zip(final, final2))

    row = {
        "name": name,
        "sharded": sharded,
        "bytes_rank": bytes_rank,
        "resume_diff": resume_diff,
        "loss_first": losses[0] if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
    }
    if rank == 0:  # one process on the whole global batches, plain loop
        device = torch.device("cuda", torch.cuda.current_device())
        model = _model().to(device)
        init = [p.detach().float().cpu().clone() for p in model.parameters()]
        cls, kw = optimizer_cls_and_kwargs(name, args)
        opt = cls()(model, **kw)
        g = a.batch * world
        for t in range(a.steps):
            ids = data.ids[t * g : (t + 1) * g].to(device)
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        ref = [p.detach().float().cpu() for p in model.parameters()]
        change = max(float((r - i).abs().max()) for r, i in zip(ref, init))
        row["rel_diff"] = max(float((x - y).abs().max()) for x, y in zip(final, ref)) / change
        row["bytes_one"] = _state_bytes(opt)
        del model, opt
    dist.barrier()
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="per-device batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        print("run with torchrun --nproc_per_node=<GPUs> on a machine with CUDA GPUs (see the docstring)")
        return 2
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = tempfile.mkdtemp(prefix="gpu_fsdp2_hf_") if rank == 0 else None
    holder = [root]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    rows, ok = [], True
    for name in a.optimizers.split(","):
        try:
            rows.append(_one(name.strip(), a, world, rank, root))
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"[:200]})
    if rank == 0:
        print(f"\nHF Trainer + FSDP2, {world} GPUs ({torch.cuda.get_device_name()}), {a.steps} steps\n")
        print(
            "| optimizer | sharded | state bytes / rank | vs one process | rel. diff vs one process | resume diff | loss |"
        )
        print("|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            if "error" in r:
                ok = False
                print(f"| {r['name']} | error: {r['error']} | | | | | |")
                continue
            ratio = r["bytes_rank"] / r["bytes_one"] if r.get("bytes_one") else math.nan
            good = r["sharded"] and r["resume_diff"] == 0.0 and r.get("rel_diff", 0.0) <= a.tol
            good = good and (world == 1 or not r.get("bytes_one") or ratio <= 1.1 / world)
            ok = ok and good
            print(
                f"| {r['name']} | {r['sharded']} | {r['bytes_rank']} | {ratio:.2f}x | {r.get('rel_diff', math.nan):.2e} "
                f"| {r['resume_diff']:.2e} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
            )
        print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
        shutil.rmtree(root, ignore_errors=True)
    flag = torch.tensor([1.0 if ok else 0.0], device="cuda")
    dist.broadcast(flag, src=0)
    dist.destroy_process_group()
    return 0 if flag.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
