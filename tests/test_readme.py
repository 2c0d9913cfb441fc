"""The README's optimizer table agrees with the registry (names, classes and default learning rates)."""

from __future__ import annotations

import re
from pathlib import Path

from lit_optim.registry import available_optimizers, get_optimizer_info

README = Path(__file__).resolve().parents[1] / "README.md"


def _rows() -> dict[str, tuple[str, float]]:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `(\w+)` \| `([\w.]+)` \|.*\| ([0-9.e-]+) \| [^|]+ \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), float(m.group(3)))
    return rows


def test_readme_lists_every_registered_optimizer_with_its_default_lr():
    rows = _rows()
    assert set(rows) == set(available_optimizers())
    for name, (cls_path, lr) in rows.items():
        info = get_optimizer_info(name)
        assert lr == info.default_lr, f"README says {name} default lr {lr}, registry {info.default_lr}"
        assert cls_path.rsplit(".", 1)[-1] == info.cls.__name__, (name, cls_path)


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["bash scripts/compare.sh", "bash scripts/test.sh"]
