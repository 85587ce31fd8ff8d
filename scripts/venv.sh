#!/usr/bin/env bash
# Make (or refresh) .venv with Python >= 3.12, install a requirements file into it, then this package,
# editable, so that `.venv/bin/jaxbench` runs this checkout from any directory.
#   scripts/venv.sh [requirements file] [venv-dir]
# requirements-dev.txt (the default: CPU, tests, notebooks), requirements.txt (CPU, or a client of Vast
# workers), requirements-cuda12.txt or requirements-cuda13.txt (an NVIDIA GPU: the package's
# dependencies come with it; README.md, "Installing the package", says which).
set -euo pipefail
requirements=${1:-requirements-dev.txt}
venv=${2:-.venv}
cd "$(dirname "$0")/.."

find_python() {
    local v
    for v in 3.13 3.12; do
        if command -v "python$v" >/dev/null && "python$v" -c 'import sys' 2>/dev/null; then
            echo "python$v"; return
        fi
        if command -v pyenv >/dev/null; then
            local installed
            installed=$(pyenv versions --bare 2>/dev/null | grep -E "^$v(\.[0-9]+)?$" | sort -V | tail -n 1 || true)
            if [ -n "$installed" ]; then
                echo "env PYENV_VERSION=$installed python$v"; return
            fi
        fi
    done
    if python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        echo python3; return
    fi
    echo "no Python >= 3.12 found (jax >= 0.11 needs it)" >&2
    exit 1
}

if [ ! -x "$venv/bin/python" ]; then
    python=$(find_python)
    echo "creating $venv with $($python --version)" >&2
    $python -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$requirements"
# The package, editable: the `jaxbench` command, and whatever of its dependencies the file did not
# bring. Its build backend, setuptools, is in requirements.txt's set; where the venv already has it,
# pip builds the package with that copy instead of fetching one.
if "$venv/bin/python" -c 'import setuptools' 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --no-build-isolation -e .
else
    "$venv/bin/python" -m pip install -q -e .
fi
