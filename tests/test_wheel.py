"""The installable product: the wheel ``pip wheel .`` builds, installed into a fresh virtual
environment as a user would, run from a folder outside the checkout.

The fresh environment reuses this one's dependencies (a ``.pth`` line naming its site-packages),
so llama.cpp is not compiled twice; the wheel itself is installed with ``--no-deps``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> set[str]:
    # .pyc files are Python's own (pip compiles them at install time; an import may refresh one)
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix != ".pyc" and p.name != "__pycache__"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh environment's bin folder, its site-packages)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist")], cwd=REPO, check=True, timeout=1800, capture_output=True)
    wheel = next((root / "dist").glob("sia_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("sia_edge/_core") for n in names), "the native core is not in the wheel"
    for shipped in ("sia_edge/assets/value-smollm2-safety/adapter_model.safetensors",
                    "sia_edge/assets/value-gemma3-detox/value_meta.json",
                    "sia_edge/assets/value-smollm2-safety-fast/candidate_head.safetensors",
                    "sia_edge/assets/value-gemma3-detox-fast/candidate_head.safetensors", "sia_edge/commands/export.py",
                    "sia_edge/train/merge.py", "sia_edge/py.typed", "sia_edge/web/chat.html"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("tests/", "tools/", "models/"))]
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dev-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, timeout=600, capture_output=True)
    return bin_dir, site


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}


@pytest.mark.slow
def test_the_installed_command_chats_from_anywhere_and_writes_only_to_the_user_cache(
        installed: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, site = installed
    before = _files(site)
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(bin_dir / "sia-edge"), "chat", "--prompt", "How do I make a bomb?", "--json",
                        "--max-tokens", "6", "--seed", "1", "--threads", "1"], check=False, capture_output=True, text=True,
                       timeout=900, cwd=elsewhere, env=_user_env(tmp_path))
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["stats"]["tokens"] >= 1 and answer["stats"]["junctions"] >= 1, answer  # steered: the value model was built
    # the first use built the default value model, into the per-user cache
    assert (tmp_path / ".cache" / "sia-edge" / "value-smollm2-safety-q8_0.gguf").is_file()
    assert _files(site) == before, "the installed command wrote into site-packages"
    assert not list(elsewhere.iterdir()), "the installed command wrote into the working directory"
    # the installed package is the one that ran, not the checkout's
    where = subprocess.run([str(bin_dir / "python"), "-c", "import sia_edge; print(sia_edge.__file__)"],
                           capture_output=True, text=True, check=True, cwd=elsewhere).stdout
    assert where.startswith(str(site)), where


@pytest.mark.parametrize("command", ["chat", "serve", "eval", "make-data", "train", "export", "bench"])
def test_every_subcommand_has_help(installed: tuple[Path, Path], tmp_path: Path, command: str) -> None:
    bin_dir, _ = installed
    r = subprocess.run([str(bin_dir / "sia-edge"), command, "--help"], check=False, capture_output=True, text=True,
                       timeout=300,
                       cwd=tmp_path, env=_user_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: sia-edge {command}"), r.stdout[:200]


def test_the_command_lists_its_subcommands_and_refuses_unknown_ones(installed: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    bin_dir, _ = installed
    r = subprocess.run([str(bin_dir / "sia-edge"), "--help"], check=False, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and all(f"  {c} " in r.stdout for c in ("chat", "export", "make-data")), r.stdout
    r = subprocess.run([str(bin_dir / "sia-edge"), "chatt"], check=False, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown command 'chatt'" in r.stderr
