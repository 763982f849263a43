#!/usr/bin/env bash
# Create (or refresh) the project virtualenv: the right torch build first, then haps-ray and the packs.
#   GPU machine (a CUDA torch importable by the system python): the venv sees it (--system-site-packages)
#                and pip keeps it, since pyproject only asks for torch>=2.4.
#   CPU machine: torch==$TORCH_CPU_VERSION is installed first, so nothing pulls a multi-GB CUDA build.
#                Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where PyPI's default
#                wheel for that version is a CUDA one.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "install: CUDA torch found in the system python; the venv will reuse it"
    [ -d "$VENV" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
else
    [ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "install: CPU machine, installing torch==$TORCH_CPU_VERSION (CPU build)"
        "$VENV/bin/pip" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_CPU_VERSION"
    fi
fi
"$VENV/bin/pip" install -q -e ".[dev]"
grep -v '^#' scripts/packs.txt | xargs "$VENV/bin/pip" install -q --no-deps
"$VENV/bin/python" -c "import torch; print('install: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
