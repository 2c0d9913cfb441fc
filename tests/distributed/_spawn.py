"""Shared pieces of the FSDP2 tests: one 2-process gloo launch whose results many parametrized
tests read, and the FSDP2 sharding of a model.

The launch itself is :func:`tests.callbacks.test_weight_averaging_ddp.run_in_two_processes` (a free
port per launch, the gloo group destroyed and ``os._exit`` at the end of each worker); this module
adds :func:`launch_once`, which turns a failed launch into a message the per-case tests report
instead of failing the whole module at collection."""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

import pytest
from torch import nn

from ..callbacks.test_weight_averaging_ddp import run_in_two_processes

try:  # FSDP2's public entry point (torch >= 2.6)
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAS_FSDP2 = True
except ImportError:  # pragma: no cover
    HAS_FSDP2 = False

#: ``pytestmark`` of every FSDP2 test module: spawns 2 gloo processes; needs ``fully_shard``
FSDP2_MARKS = [pytest.mark.ddp, pytest.mark.skipif(not HAS_FSDP2, reason="needs torch.distributed.fsdp.fully_shard")]

__all__ = ["FSDP2_MARKS", "HAS_FSDP2", "launch_once", "read_results", "run_in_two_processes", "shard", "write_result"]


def shard(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every direct child with parameters (the layers), then the model: what
    torchtitan and accelerate's FSDP2 plugin do with transformer blocks."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters(recurse=True)):
            fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def write_result(out: str, rank: int, key: str, value: dict[str, Any]) -> None:
    """Append one case's result (JSON line) to ``out/rank{rank}.jsonl``: results written before a
    later case crashes or hangs are kept."""
    with open(os.path.join(out, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"key": key, **value}) + "\n")


def read_results(out: str, rank: int) -> dict[str, dict[str, Any]]:
    path = os.path.join(out, f"rank{rank}.jsonl")
    if not os.path.exists(path):
        return {}
    res = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            res[d.pop("key")] = d
    return res


def launch_once(fn, out: str, *args, timeout: float = 600.0) -> str | None:
    """Run ``fn(out, *args)`` in 2 processes; None on success, else the error (a message, so that
    every test reading the results can report it next to the cases that did finish)."""
    try:
        run_in_two_processes(fn, out, *args, timeout=timeout)
    except Exception:  # noqa: BLE001 - reported by the tests that read the results
        return traceback.format_exc(limit=3)[-3000:]
    return None
