"""SIMD kernels against the scalar kernels in C++ (tests/native/kernel_parity.cpp).

The Python tests (test_kernels.py) force every instruction set this machine has. NEON cannot run
here, so its kernels are cross-compiled for arm64 and run under qemu-aarch64 when both tools are
installed (`apt-get install g++-aarch64-linux-gnu qemu-user`); otherwise that test is skipped and
says why. The x86 run of the same program keeps the C++ harness itself honest.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"


def build_and_run(compiler: str, flags: list[str], sources: list[str], runner: list[str], out: Path) -> str:
    cmd = [compiler, "-O2", "-std=c++17", "-Wall", "-Wextra", *flags, f"-I{KERNELS}",
           str(ROOT / "tests" / "native" / "kernel_parity.cpp"), *[str(KERNELS / s) for s in sources], "-o", str(out)]
    build = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([*runner, str(out)], check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    return run.stdout


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
def test_avx2_matches_scalar_in_cpp(tmp_path: Path) -> None:
    from sia_edge import kernels

    if "avx2" not in kernels.available_isas():
        pytest.skip("this CPU has no AVX2")
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler is needed to build the extension, so one should be here"
    out = build_and_run(compiler, ["-mavx2", "-mfma"], ["avx2.cpp", "scalar.cpp"], [], tmp_path / "parity")
    assert "avx2 vs scalar:" in out and " 0 failures" in out


def test_neon_matches_scalar_under_qemu(tmp_path: Path) -> None:
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (compiler and qemu):
        pytest.skip("no arm64 cross-compiler and qemu-aarch64 here (apt-get install g++-aarch64-linux-gnu qemu-user)")
    out = build_and_run(compiler, ["-static"], ["neon.cpp", "scalar.cpp"], [qemu], tmp_path / "parity")
    assert "neon vs scalar:" in out and " 0 failures" in out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
def test_imports_and_runs_on_a_cpu_without_avx() -> None:
    # The ISA files are compiled with -mavx2 / -mavx512f: nothing in them may run before
    # dispatch.cpp has checked the CPU, or an older CPU dies with SIGILL at import time. qemu's
    # Nehalem model has SSE4.2 and no AVX.
    qemu = shutil.which("qemu-x86_64")
    if not qemu:
        pytest.skip("no qemu-x86_64 here (apt-get install qemu-user)")
    code = (
        "import numpy as np\n"
        "from sia_edge import kernels as K\n"
        "z = np.random.default_rng(0).standard_normal(5000).astype(np.float32)\n"
        "t = K.TopK(10)\n"
        "s = K.junction_stats(z, t)\n"
        "assert int(t.ids[0]) == int(np.argmax(z)) and s.full_lse > s.topk_entropy\n"
        "print(K.available_isas())\n"
    )
    run = subprocess.run([qemu, "-cpu", "Nehalem", sys.executable, "-c", code], check=False,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "['scalar']"
