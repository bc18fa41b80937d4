#!/usr/bin/env bash
# One-time set-up: .venv with the exact versions in requirements.lock (+ test tools), gendist
# installed editable. Re-running is a no-op until a lock file or pyproject.toml changes.
#
# torch is pinned to the CUDA 13 build (torch 2.14.1 + torchvision 0.29.1 from PyPI): it runs on
# CPU too, and PyPI's torchvision only imports beside PyPI's own torch build. torch alone is about
# 5.6 GB; with ray[tune] and the rest, .venv is about 6.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.gendist-install
wanted=$(cat requirements.lock requirements-test.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    exit 0
fi
echo "setting up .venv from requirements.lock (first time: a few minutes, ~6.4 GB)" >&2
"$python" -m venv .venv
# Some machines' pip configs name extra local indexes; their harmless 'ignored' warnings are dropped.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet .venv/bin/python -m pip install --quiet --no-input -r requirements.lock -r requirements-test.lock
quiet .venv/bin/python -m pip install --quiet --no-input --no-deps -e .
echo "$wanted" > "$stamp"
