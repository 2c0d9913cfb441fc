"""Packaging (issue 15 item 20): the wheel built from this tree holds every file of the package,
its documented extras exist and resolve, and, installed into a fresh virtual environment, the
console script runs and every public module imports from the installed copy (not from the clone).

Offline by design: the wheel is built with ``pip wheel --no-deps --no-build-isolation`` (the build
backend, setuptools, is in the test environment), installed with ``--no-deps --no-index``, and the
fresh environment reaches the dependencies already installed here (torch, lightning,
transformers ...) through a ``.pth`` file that appends this environment's site-packages, after
its own. This environment's editable install of lit_optim is not visible there (``.pth`` files of
an appended folder are not executed, and the fresh environment runs with the working directory
outside the clone and no ``PYTHONPATH``), which the test checks.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the extras the README's install section tells users to install
DOCUMENTED_EXTRAS = ("hf", "plot", "cli")

_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "runs", "lightning_logs", ".pytest_cache"
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this tree (built outside the shared working tree: setuptools writes
    build/ and *.egg-info next to the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
    )
    (whl,) = (tmp / "dist").glob("lit_optim-*.whl")
    return whl


def _package_files() -> set[str]:
    """Every file of the lit_optim package in this tree (what the wheel must hold)."""
    out = set()
    for path in (ROOT / "lit_optim").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            out.add(path.relative_to(ROOT).as_posix())
    return out


@pytest.mark.slow  # builds the wheel (shared with the next test)
def test_wheel_holds_every_file_of_the_package_and_the_documented_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_string(z.read(meta_name).decode())
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(ep_name).decode()
    missing = _package_files() - names
    assert not missing, f"files of the package left out of the wheel: {sorted(missing)}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    assert "lit-optim = lit_optim.cli:main" in entry_points
    assert f"dist/{wheel.name}[" in README.read_text(encoding="utf-8"), "the README names another wheel file"
    extras = set(meta.get_all("Provides-Extra"))
    assert set(DOCUMENTED_EXTRAS) <= extras, extras
    # the cli extra carries what LightningCLI needs (issue 15 item 12)
    cli_reqs = [r for r in meta.get_all("Requires-Dist") if 'extra == "cli"' in r]
    assert any(r.startswith("jsonargparse[signatures]") for r in cli_reqs), cli_reqs


def test_pyproject_has_a_cli_extra_for_lightning_cli():
    """Issue 15 item 12: LightningCLI needs jsonargparse[signatures], which was only in ``dev``."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.replace(" ", "").startswith("jsonargparse[signatures]") for r in extras["cli"])
    assert set(DOCUMENTED_EXTRAS) <= set(extras)


def test_readme_install_section_names_the_documented_extras():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Install as a library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, "the install section has no commands"
    cmds = "\n".join(blocks)
    spec = "[" + ",".join(DOCUMENTED_EXTRAS) + "]"
    assert f'pip install ".{spec}"' in cmds and f'pip install -e ".{spec}"' in cmds, cmds
    assert "python -m build" in cmds and re.search(r"pip install \"dist/lit_optim-[^\"]*\.whl\[", cmds), cmds
    assert 'pip install "lit-optim[' not in text  # the package is not on PyPI


def _requirements_met(requirements: list[str], extras: tuple[str, ...]) -> list[str]:
    from packaging.requirements import Requirement

    unmet = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{line} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{line} (installed: {version})")
    return unmet


@pytest.mark.slow  # builds a virtual environment and starts three interpreters
def test_installed_wheel_runs_the_console_script_and_imports_every_public_module(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    vpy = venv / "bin" / "python"
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies installed here, after the fresh environment's own site-packages
    (site / "_deps_of_the_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(vpy),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            f"{wheel}[{','.join(DOCUMENTED_EXTRAS)}]",
        ],
        cwd=tmp_path,
    )
    # the documented extras resolve against what is installed (pip with --no-deps does not check)
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        reqs = email.message_from_string(z.read(meta_name).decode()).get_all("Requires-Dist")
    assert not _requirements_met(reqs, DOCUMENTED_EXTRAS)

    # the console script the README documents
    out = _run([str(venv / "bin" / "lit-optim"), "list"], cwd=tmp_path).stdout
    import lit_optim

    for name in lit_optim.available_optimizers():
        assert f"  {name} " in out

    # every public module from the installed copy
    modules = sorted(_public_modules())
    probe = f"""
import importlib, json, sys
import lit_optim
mods = {modules!r}
files = {{m: importlib.import_module(m).__file__ for m in mods}}
# the documented attribute access (issue 15 item 11) from the installed copy too
files["lit_optim.callbacks.HessianDiagCallback"] = lit_optim.callbacks.HessianDiagCallback.__module__
files["lit_optim.integrations.hf.LitTrainer"] = lit_optim.integrations.hf.LitTrainer.__module__
print(json.dumps(files))
"""
    files = json.loads(_run([str(vpy), "-c", probe], cwd=tmp_path).stdout.strip().splitlines()[-1])
    for mod, file in files.items():
        if mod.endswith(("HessianDiagCallback", "LitTrainer")):
            continue
        assert Path(file).resolve().is_relative_to(site.resolve()), f"{mod} imported from {file}, not the wheel"


def _public_modules() -> list[str]:
    """``lit_optim`` and every module of it whose dotted path has no part starting with ``_``
    (``__init__`` files stand for their package)."""
    out = []
    for path in (ROOT / "lit_optim").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        out.append(".".join(parts))
    return out


def test_public_modules_cover_the_hf_package_parts():
    mods = set(_public_modules())
    assert {
        "lit_optim.callbacks",
        "lit_optim.integrations.hf",
        "lit_optim.integrations.hf.callbacks",
        "lit_optim.integrations.hf.optimizers",
        "lit_optim.integrations.hf.curvature",
        "lit_optim.integrations.hf.trainer",
        "lit_optim.integrations.peft",
    } <= mods
