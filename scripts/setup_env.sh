#!/usr/bin/env bash
# Create .venv/ and install the toolkit with its dev, tracking, DeepSpeed and QLoRA extras. Idempotent: re-runs only
# when pyproject.toml or this script changed.
#
# torch is pinned in the same pip command: an unpinned torch request on a CPU-only machine pulls several GB
# of CUDA wheels. On a GPU machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-${TORCH_SPEC//[^a-zA-Z0-9.]/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into .venv ($TORCH_SPEC, transformers, peft, accelerate, trl, datasets, deepspeed, ...)"
  # DS_BUILD_OPS=0: DeepSpeed compiles its C++/CUDA ops on first use instead of at install time.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "$TORCH_SPEC" -e ".[dev,track,deepspeed,qlora]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The report test renders report.html in headless Chromium (Debian's package). CI runs as root and installs it;
# elsewhere the test is skipped when no browser is found (install it with: apt-get install chromium).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium (Debian package) for the report test"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
