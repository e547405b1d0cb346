"""The package as a wheel: built with `pip wheel`, installed into a fresh venv, `ditfa demo` runs from that install,
the testbed weights, tokenizer and configs travelling as package data. No network: the build uses the test venv's
setuptools (--no-build-isolation) and the new venv sees the test venv's dependencies through a .pth file."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "ditfa_jax", "convert", "pallas_kernels"]


def run(*cmd, **kwargs):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp_path / "dist")
    [wheel] = (tmp_path / "dist").glob("ditfa_jax-*.whl")

    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ditfa_jax/testbed").rglob("*")
               if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts}
    assert "ditfa_jax/testbed/checkpoint/transformer/params.safetensors" in shipped
    assert shipped <= set(zipfile.ZipFile(wheel).namelist()), "every testbed file travels in the wheel"

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-deps", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # jax, flax, ...: appended after

    outside = tmp_path / "elsewhere"  # not the checkout, so that its sources cannot be imported
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    where = run(python, "-c", "import ditfa_jax; print(ditfa_jax.__file__)", cwd=outside, env=env).strip()
    assert Path(where).is_relative_to(venv), where
    run(venv / "bin" / "ditfa", "demo", "--out", outside / "demo", "--prompts", "1", "--calibration-prompts", "1",
        "--steps", "2", cwd=outside, env=env)
    report = json.loads((outside / "demo" / "report.json").read_text())
    assert Path(report["checkpoint"]).is_relative_to(venv)  # the weights read were the installed package data
    assert (outside / "demo" / "comparison.png").is_file()
