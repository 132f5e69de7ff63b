"""The built wheel, not the editable install: it ships conf/ and callbacks/, imports, and runs the demo.

The wheel goes into a fresh venv with `--no-deps`. The dependencies come from the running venv through a `.pth`
line holding its site-packages path: a plain path line is added to sys.path without processing that folder's own
`.pth` files, so the editable-install hook of fluxlora there never runs and the wheel's copy is the one imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# what must never be copied into the build tree: VCS data, run outputs, earlier build products
_NOT_SOURCE = shutil.ignore_patterns(".git", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".venv", "*.ckpt", "*.safetensors")
WHEEL_FILES = ("fluxlora/__main__.py", "fluxlora/conf/config.yaml", "fluxlora/conf/vram/12gb.yaml",
               "fluxlora/conf/model/tiny.yaml", "fluxlora/conf/callbacks/default.yaml",
               "fluxlora/callbacks/__init__.py", "fluxlora/callbacks/lora_saver.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(args: list, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the source tree, so no build/ or egg-info lands in the repo."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
          "-w", tmp / "dist", src], cwd=tmp)
    wheels = list((tmp / "dist").glob("fluxlora-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_python(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel's fluxlora; the dependencies are borrowed from this venv."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    assert purelib.is_relative_to(venv)
    (purelib / "_parent_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_wheel_ships_configs_and_callbacks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in WHEEL_FILES if f not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith(("tests/", "callbacks/", "conf/")) for n in names)  # only under fluxlora/
    vram = {n.rsplit("/", 1)[1] for n in names if re.fullmatch(r"fluxlora/conf/vram/[^/]+\.yaml", n)}
    assert vram == {f.name for f in (REPO / "conf" / "vram").glob("*.yaml")}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fluxlora = fluxlora.__main__:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_wheel_imports_from_the_fresh_venv(wheel_python, tmp_path):
    venv = wheel_python.parents[1]
    code = ("import fluxlora, fluxlora.callbacks, fluxlora.conf\n"
            "from fluxlora.callbacks import LoRASaver, LossSummary, TimedSampler\n"
            "from importlib.resources import files\n"
            "print(fluxlora.__file__)\n"
            "print(fluxlora.callbacks.__file__)\n"
            "print(LoRASaver.__module__)\n"
            "print(files('fluxlora.conf').joinpath('vram', '12gb.yaml').is_file())\n")
    lines = _run([wheel_python, "-c", code], cwd=tmp_path).stdout.split()
    pkg, callbacks, saver_module, has_tier = lines[-4:]
    assert Path(pkg).is_relative_to(venv), f"imported {pkg}, not the wheel in {venv}"
    assert Path(callbacks).is_relative_to(venv), callbacks
    assert saver_module.startswith("fluxlora.callbacks")
    assert has_tier == "True"
    assert (venv / "bin" / "fluxlora").is_file()  # the console script


@pytest.mark.slow
def test_wheel_runs_the_demo(wheel_python, tmp_path):
    proc = _run([wheel_python, "-m", "fluxlora", "+vram=12gb", f"output.root={tmp_path}", "trainer.max_epochs=2"],
                cwd=tmp_path)
    saved = re.findall(r"^LoRA saved to (.+)$", proc.stdout, re.M)
    assert saved and Path(saved[-1]) == tmp_path / "flux-lora" / "flux-lora.safetensors"
    assert Path(saved[-1]).is_file()
    assert list((tmp_path / "flux-lora" / "sample").glob("*_grid.png"))
