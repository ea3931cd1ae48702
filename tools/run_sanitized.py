#!/usr/bin/env python3
"""Run tests against the native core built with AddressSanitizer and UndefinedBehaviorSanitizer.

    python tools/run_sanitized.py                      # tests/test_kernels.py
    python tools/run_sanitized.py tests/test_abuse_api.py -k "closed or dropped"

Builds ``sia_edge._core`` with ``-fsanitize=address,undefined`` into ``build/sanitize`` (CMake and
pybind11 from this environment: the dev extra), then runs pytest in this process with that
module in place of the installed one, the sanitizer runtimes preloaded (Python itself is not
instrumented). Only code running in this process is checked: tests that start a child process
run the child on the ordinary build. llama.cpp comes from llama-cpp-python, uninstrumented, so
this checks our kernels and bindings, not llama.cpp. docs/TESTING.md says when to run it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "sanitize"
FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
MARK = "SIA_EDGE_SANITIZED"


def runtime(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        sys.exit(f"error: the compiler has no {name}; install gcc's sanitizer runtimes (Debian: libasan8 libubsan1)")
    return path


def build() -> Path:
    import pybind11

    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} is not on PATH; the sanitized build needs it")
    configure = ["cmake", "-S", str(REPO), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                 "-DSKBUILD_PROJECT_NAME=sia_edge", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_CXX_FLAGS={FLAGS}"]
    for cmd in (configure, ["cmake", "--build", str(BUILD), "--parallel"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"error: {' '.join(cmd[:2])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = sorted(BUILD.glob("_core*.so"))
    if not found:
        sys.exit(f"error: the build left no _core*.so in {BUILD}")
    return found[0]


def main() -> int:
    args = sys.argv[1:] or ["tests/test_kernels.py"]
    if os.environ.get(MARK) is None:  # first pass: build, then run again with the runtimes preloaded
        module = build()
        env = dict(os.environ, **{MARK: str(module), "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
                                  "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
        return subprocess.run([sys.executable, __file__, *args], env=env, cwd=REPO, check=False).returncode
    import sia_edge

    spec = importlib.util.spec_from_file_location("sia_edge._core", os.environ[MARK])
    assert spec is not None and spec.loader is not None
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["sia_edge._core"] = core  # before sia_edge.kernels imports it
    sia_edge._core = core  # type: ignore[attr-defined]
    import pytest

    print(f"sanitized core: {core.__file__}", file=sys.stderr)
    return int(pytest.main(["-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    sys.exit(main())
