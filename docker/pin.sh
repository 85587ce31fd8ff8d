#!/usr/bin/env bash
# Regenerate the image's exact pins of one flavour, docker/constraints-<flavour>.txt:
#   docker/pin.sh cuda12    everything pip resolves for the model server's share of requirements.txt
#                           (the lines above its pyworker-only section) with requirements-cuda12.txt;
#   docker/pin.sh cuda13    the same with requirements-cuda13.txt, holding every package the two
#                           flavours share at its cuda12 pin, so that the images differ only in
#                           JAX's CUDA plugin and NVIDIA's wheels. Run it after cuda12.
# It needs Python 3.13 on linux x86_64 (the image's) as python3.13, and the package index; it
# installs nothing (pip's --dry-run in a venv of its own). tests/test_packaging.py checks the result.
set -euo pipefail
flavour=${1:?usage: docker/pin.sh cuda12|cuda13}
cd "$(dirname "$0")/.."
[ -f "requirements-$flavour.txt" ] || { echo "no requirements-$flavour.txt" >&2; exit 2; }
python3.13 -c 'import platform, sys; sys.exit(platform.machine() != "x86_64" or sys.platform != "linux")' \
    || { echo "pins are resolved for linux x86_64, the image's platform" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3.13 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
sed '/^# pyworker-only/,$d' requirements.txt > "$work/model-server-requirements.txt"
: > "$work/held.txt"
if [ "$flavour" != cuda12 ]; then
    # The shared packages at their cuda12 pins; cuda12's own (its plugin and NVIDIA wheels) left out.
    grep -v -E '^(#|jax-cuda12-|nvidia-.*-cu12==)' docker/constraints-cuda12.txt > "$work/held.txt"
fi
"$work/venv/bin/python" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" \
    -r "$work/model-server-requirements.txt" -r "requirements-$flavour.txt" -c "$work/held.txt"

out="docker/constraints-$flavour.txt"
{
    sed -n '/^#/p' "$out" 2>/dev/null || true
    "$work/venv/bin/python" - "$work/report.json" <<'EOF'
import json, re, sys
pins = [re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower() + "==" + i["metadata"]["version"]
        for i in json.load(open(sys.argv[1]))["install"]]
print("\n".join(sorted(pins)))
EOF
} > "$work/constraints.txt"
mv "$work/constraints.txt" "$out"
echo "wrote $out" >&2
