"""`pip install .`: the wheel pyproject.toml builds, its dependencies, and the `jaxbench` command it
installs, run outside the repository.

The wheel goes into a fresh venv without its dependencies (downloading jax[cuda12] takes minutes);
a .pth file lends it the packages of the interpreter running the tests. README.md's "Installing
the package" states the full install that was checked by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from packaging.requirements import Requirement

from conftest import ROOT

BUILD_INPUTS = ["pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt", "jaxbench"]


def requirement_lines(path: Path) -> list[str]:
    return [str(Requirement(line.split("#")[0])) for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_the_wheel_installs_a_jaxbench_command_that_works_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in BUILD_INPUTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("jaxbench-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "lend-the-test-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    metadata = subprocess.run(
        [python, "-c", "import importlib.metadata as m, json; print(json.dumps(m.requires('jaxbench')))"],
        check=True, capture_output=True, text=True).stdout
    requires = [str(Requirement(r)) for r in json.loads(metadata)]
    assert requires[: len(requirement_lines(ROOT / "requirements.txt"))] == requirement_lines(ROOT / "requirements.txt")
    dev = [r for r in requires if 'extra == "dev"' in r]
    assert len(dev) == len(requirement_lines(ROOT / "requirements-dev.txt"))

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    command = env_dir / "bin" / "jaxbench"
    help_text = subprocess.run([command, "--help"], cwd=outside, capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: jaxbench"), help_text.stderr
    out = subprocess.run([command, "distances", "--params", "tiny", "--block-hash", "ab", "--public-key", "k",
                          "--nonces", "0-2", "--cache-dir", ""], cwd=outside, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["dist"]) == 3
    # It ran the installed copy, not this checkout.
    where = subprocess.run([python, "-c", "import jaxbench; print(jaxbench.__file__)"], cwd=outside,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site)
