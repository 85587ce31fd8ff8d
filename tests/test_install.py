"""`pip install .`: the wheel pyproject.toml builds, its dependencies and extras, and the `jaxbench`
command it installs, run outside the repository.

Nothing is downloaded: a fresh venv is lent the packages of the interpreter running the tests
(through a directory of links, named by a .pth file), and pip installs the wheel from the local file
only. Lent without JAX's CUDA runtime, that venv is what a laptop gets from `pip install jaxbench`:
the client must install and run there. README.md's "Installing the package" states the full
installs that were checked by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

BUILD_INPUTS = ["pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt", "requirements-cuda12.txt",
                "requirements-cuda13.txt", "jaxbench"]
PIP = [sys.executable, "-m", "pip", "--isolated"]  # no pip configuration: the local files only
# Top-level names in site-packages of JAX's CUDA runtime: its plugins and NVIDIA's libraries.
CUDA_RUNTIME = ("jax_plugins", "jax_cuda", "nvidia")


def requirement_lines(path: Path) -> list[str]:
    return [str(Requirement(line.split("#")[0])) for line in path.read_text().splitlines() if line.split("#")[0].strip()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in BUILD_INPUTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("jaxbench-*.whl")
    return built


def venv_lent_the_test_packages(env_dir: Path, leave_out: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A new venv that sees this interpreter's packages but jaxbench itself (which it is to install)
    and those whose top-level names start with `leave_out`: (its python, its site-packages)."""
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    lent = env_dir / "lent"
    lent.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("jaxbench", "__editable__", *leave_out)):
            (lent / entry.name).symlink_to(entry)
    (site / "lend-the-test-packages.pth").write_text(f"{lent}\n")
    return python, site


def test_the_wheel_installs_a_jaxbench_command_that_works_anywhere(tmp_path, wheel):
    env_dir = tmp_path / "venv"
    python, site = venv_lent_the_test_packages(env_dir)
    subprocess.run([*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)

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
    assert where.startswith(str(site))


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    return [Requirement(line.split(":", 1)[1]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def test_the_gpu_runtimes_are_extras_as_in_jax(wheel):
    """`pip install jaxbench` brings plain jax (its CPU build); `jaxbench[cuda12]` and `[cuda13]` add
    JAX's CUDA runtime of that version, as `jax[cuda12]` and `jax[cuda13]` do."""
    requires = wheel_requirements(wheel)
    base = [r for r in requires if r.marker is None or "extra" not in str(r.marker)]
    (jax,) = [r for r in base if r.name == "jax"]
    assert jax.extras == set()
    assert not [r for r in base if r.extras or r.name.startswith(("nvidia", "jax-cuda", "jaxlib"))], base
    for flavour in ("cuda12", "cuda13"):
        (extra,) = [r for r in requires if r.name == "jax" and r.marker is not None
                    and r.marker.evaluate({"extra": flavour}) and not r.marker.evaluate({"extra": ""})]
        assert extra.extras == {flavour} and extra.specifier == jax.specifier


def test_a_client_only_install_runs_remote_search_without_cuda(tmp_path, wheel):
    """What a laptop gets: the wheel installed with its dependencies, none of them JAX's CUDA runtime.
    pip resolves every dependency offline against the lent packages, from which that runtime is
    left out, so it succeeds only if the plain install needs none of it."""
    python, site = venv_lent_the_test_packages(tmp_path / "venv", leave_out=CUDA_RUNTIME)
    install = subprocess.run([*PIP, "--python", str(python), "install", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    cuda = subprocess.run([python, "-c", "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in "
                           "m.distributions() if d.metadata['Name'].lower().startswith(('nvidia', 'jax-cuda', 'jax_cuda'))))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert cuda == "[]"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    help_text = subprocess.run([tmp_path / "venv" / "bin" / "jaxbench", "remote", "search", "--help"], cwd=outside,
                               capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: jaxbench remote search") and "--endpoint" in help_text.stdout


def test_the_setup_script_installs_the_checkout_editable(tmp_path):
    """scripts/venv.sh, the quick start's first step: the venv it makes has a `jaxbench` command that
    runs the checkout itself from any directory. Run on a copy of the checkout, into a venv lent the
    test packages, with pip kept off every index (PIP_NO_INDEX) so that nothing is downloaded."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv.sh", checkout / "scripts" / "venv.sh")
    for name in BUILD_INPUTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, checkout / name)
    env_dir = tmp_path / "venv"
    venv_lent_the_test_packages(env_dir)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    setup = subprocess.run(["bash", checkout / "scripts" / "venv.sh", "requirements-dev.txt", env_dir], env=env,
                           capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stdout + setup.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([env_dir / "bin" / "jaxbench", "--help"], cwd=outside, capture_output=True, text=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert where.returncode == 0 and where.stdout.startswith("usage: jaxbench"), where.stderr
    module = subprocess.run([env_dir / "bin" / "python", "-c", "import jaxbench; print(jaxbench.__file__)"], cwd=outside,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(module) == checkout / "jaxbench" / "__init__.py"  # the checkout, not a copy in site-packages
