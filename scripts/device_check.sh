#!/usr/bin/env bash
# The device check for a lent GPU: one command, about 5 minutes, one table (scripts/device_check.py).
#
#     bash scripts/device_check.sh            # on the GPU machine, from a copy of the repository
#     bash scripts/device_check.sh --cpu      # the same script, its rows' code on the CPU at test sizes
#
# Sets up its own environment in .venv-device (kept for the next run; HDA_DEVICE_VENV to move it): a
# venv that sees the machine's own packages, so a CUDA torch already installed there is used as it is;
# otherwise torch from PyPI (whose Linux wheels are CUDA builds), then requirements.txt, then gsplat
# (its prebuilt CUDA wheel for this torch when the gsplat index has one, else PyPI's source package,
# which compiles its CUDA kernels on first use and needs nvcc). Needs only python3 and the package
# registries. The table goes to stdout; exit status 1 when a row FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV="${HDA_DEVICE_VENV:-.venv-device}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV" || { echo "device_check: cannot create $VENV"; exit 1; }
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    pip_install "$(grep -E '^torch[=<>]' requirements.txt | sed 's/ *#.*//')" || echo "device_check: torch install failed"
fi
pip_install -r <(grep -v -E '^(torch|gsplat)[=<>]' requirements.txt) || echo "device_check: requirements install failed"
if ! "$PY" -c 'import gsplat' 2>/dev/null; then
    GSPLAT="$(grep -E '^gsplat[=<>]' requirements.txt | sed 's/ *#.*//')"
    TAG="$("$PY" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"pt{v[0]}{v[1]}cu" + (torch.version.cuda or "").replace(".", ""))' 2>/dev/null)"
    pip_install "$GSPLAT" --index-url "https://docs.gsplat.studio/whl/$TAG" 2>/dev/null \
        || pip_install "$GSPLAT" || echo "device_check: gsplat install failed (the gsplat row will say why)"
fi
echo "device_check: environment ready in $(( $(date +%s) - start )) s ($VENV)"
OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD" timeout 280 "$PY" scripts/device_check.py "$@"
status=$?
echo "device_check: finished in $(( $(date +%s) - start )) s"
exit $status
