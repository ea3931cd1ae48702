"""Reading GGUF headers fast: key/value metadata and where each tensor is, without the data;
and a ``gguf.GGUFWriter`` that writes numpy float arrays in one piece.

``gguf.GGUFReader`` builds a Python object per array element, which takes many seconds for a
vocabulary of tens or hundreds of thousands of tokens; these walk the header with ``struct``
over a memory map instead. ``GGUFWriter`` packs an array element by element, which is as slow
for a candidate head's table over such a vocabulary (``value_format``); ``gguf_writer`` packs a
numpy float array with one ``tobytes``. The value GGUF's own keys are defined in ``value_format``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import gguf

__all__ = ["GGUFError", "GGUFTensorInfo", "gguf_writer", "read_gguf_kv", "read_gguf_tensor_infos"]


class GGUFError(ValueError):
    """A file is not a readable GGUF; the message says why and what to do."""


@contextlib.contextmanager
def _header(p: Path) -> Iterator[tuple[mmap.mmap, int, int]]:
    """The file mapped, checked to be a little-endian GGUF v2 or v3: (map, tensors, keys). Any
    failure to read it, in here or in the caller's block, becomes one ``GGUFError``."""
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise GGUFError(f"{p}: not a GGUF file (starts with {bytes(buf[:4])!r})")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise GGUFError(f"{p}: unsupported GGUF version {version} (big-endian file?)")
            yield buf, n_tensors, n_kv
    except GGUFError:
        raise
    except (OSError, ValueError, KeyError, IndexError, OverflowError, MemoryError, struct.error) as exc:
        # the reader's body too: a header cut short, or a corrupt length
        raise GGUFError(f"{p}: not a readable GGUF file: truncated or not a GGUF ({exc}); re-export or "
                        "re-download it") from None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_writer(path: str | os.PathLike[str], arch: str, **kwargs: object) -> gguf.GGUFWriter:
    """A ``gguf.GGUFWriter`` (same arguments) that packs a numpy float array value
    (``add_array(key, ndarray)``) with one ``tobytes`` instead of element by element."""
    import gguf

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val: object, vtype: gguf.GGUFValueType, add_vtype: bool,
                      sub_type: gguf.GGUFValueType | None = None) -> bytes:
            # floats only: an integer array's element type is picked from its first value, and a cast
            # would wrap larger values silently where GGUFWriter raises
            if vtype != gguf.GGUFValueType.ARRAY or not isinstance(val, np.ndarray):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            if val.dtype.kind != "f" or (
                    sub_type is not None and sub_type not in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64)):
                return super()._pack_val(val.ravel().tolist(), vtype, add_vtype, sub_type)
            # the element type as GGUFWriter picks it for the same values as Python numbers
            ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val.flat[0].item())
            dtype = np.dtype(_GGUF_NP[int(ltype)])
            if self.endianess != gguf.GGUFEndian.LITTLE:
                dtype = dtype.newbyteorder(">")
            data = np.ascontiguousarray(val.ravel(), dtype=dtype)
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", ltype) + self._pack("Q", data.size) + data.tobytes()

    return _Writer(str(path), arch, **kwargs)  # type: ignore[arg-type]


def read_gguf_kv(path: str | os.PathLike[str], *, with_types: bool = False,
                 numpy_arrays: bool = False) -> dict[str, object]:
    """All key/value metadata of a GGUF file (no tensors), parsed directly. With ``with_types``
    each value is a tuple ``(value, GGUF value type, array element type or None)``. Arrays of
    numbers are lists, or with ``numpy_arrays`` numpy arrays (no Python object per element).

    ``gguf.GGUFReader`` builds a numpy view per array element, slow for a vocabulary of tens of
    thousands of tokens; this walks the header with ``struct`` instead."""
    p = Path(path)
    with _header(p) as (buf, _n_tensors, n_kv):
        off = 24

        def string() -> str:
            nonlocal off
            (n,) = struct.unpack_from("<Q", buf, off)
            off += 8
            raw = bytes(buf[off:off + n])
            off += n
            return raw.decode("utf-8", "surrogateescape")

        def value(vtype: int) -> object:
            nonlocal off
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY:
                sub, n = struct.unpack_from("<IQ", buf, off)
                off += 12
                if sub == _GGUF_STRING:
                    return [string() for _ in range(n)]
                if sub == _GGUF_ARRAY:
                    return [value(_GGUF_ARRAY) for _ in range(n)]
                dt = np.dtype(_GGUF_NP[sub])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=off).copy()
                off += n * dt.itemsize
                if sub == 7:
                    arr = arr.astype(bool)
                return arr if numpy_arrays else arr.tolist()
            fmt = _GGUF_SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, buf, off)
            off += struct.calcsize(fmt)
            return v

        out: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            sub = struct.unpack_from("<I", buf, off)[0] if vtype == _GGUF_ARRAY else None
            out[key] = (value(vtype), vtype, sub) if with_types else value(vtype)
        return out


class GGUFTensorInfo(NamedTuple):
    """Where a tensor of a GGUF file is: its shape in numpy order (rows first), GGML type number,
    and the absolute file offset and size of its data."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


def read_gguf_tensor_infos(path: str | os.PathLike[str]) -> dict[str, GGUFTensorInfo]:
    """The tensors of a GGUF file without their data, in file order. Walks the header like
    ``read_gguf_kv``, skipping the values (``gguf.GGUFReader`` builds an object per vocabulary
    entry, slow for large vocabularies)."""
    import gguf

    p = Path(path)
    with _header(p) as (buf, n_tensors, n_kv):
        off = 24
        alignment = 32  # GGUF's default

        def string() -> str:
            nonlocal off
            (n,) = struct.unpack_from("<Q", buf, off)
            off += 8 + n
            return bytes(buf[off - n:off]).decode("utf-8", "surrogateescape")

        def skip_value(vtype: int) -> None:
            nonlocal off
            if vtype == _GGUF_STRING:
                (n,) = struct.unpack_from("<Q", buf, off)
                off += 8 + n
            elif vtype == _GGUF_ARRAY:
                sub, n = struct.unpack_from("<IQ", buf, off)
                off += 12
                if sub in (_GGUF_STRING, _GGUF_ARRAY):
                    for _ in range(n):
                        skip_value(sub)
                else:
                    off += n * np.dtype(_GGUF_NP[sub]).itemsize
            else:
                off += struct.calcsize(_GGUF_SCALARS[vtype])

        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            if key == "general.alignment" and vtype in _GGUF_SCALARS:
                alignment = int(struct.unpack_from(_GGUF_SCALARS[vtype], buf, off)[0])
            skip_value(vtype)
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            ggml_type, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            raw.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(rel)))
        start = off + (-off % alignment)
        out: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, rel in raw:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
            if start + rel + nbytes > len(buf):
                raise GGUFError(f"{p}: tensor {name} lies past the end of the file: truncated; "
                                       "re-export or re-download it")
            out[name] = GGUFTensorInfo(shape, ggml_type, start + rel, nbytes)
        return out
