"""The native few-row matmul (`gemv.c`), built with the system C compiler at first use.

`gemv(x, w)` computes `F.linear(x, w)` for 1-4 rows of fp32 on the CPU by streaming w
once; `swiglu(x, w13, w2)` runs one token through a SwiGLU expert in one call (the
same two matmuls around silu(g) * u); `available()` says whether they can run here.

The library is compiled with `cc -O3 -march=native -ffast-math` into a per-user cache
keyed by the source, the command and the CPU (`$HMST_CACHE`, default
~/.cache/hmst/kernels), written to a temp file and renamed, then loaded with ctypes.
No compiler, a failed build or `HMST_NATIVE=0` leaves it unavailable and callers keep
the PyTorch path (which is also the reference: tests compare the two). Results differ
from PyTorch's in summation order only (fp32, relative ~1e-6).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv.c")
MAX_ROWS = 4
_lib = None  # ctypes function, False once a build failed, None before the first try
_swiglu = None  # its companion, loaded with it


def _cache_dir() -> str:
    root = os.environ.get("HMST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hmst"
    )
    return os.path.join(root, "kernels")


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str) -> str:
    with open(SOURCE, "rb") as f:
        src = f.read()
    # libm (+ libmvec, for vectorised expf) goes after the source, or it is dropped
    cmd = [cc, "-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", SOURCE, "-lm"]
    digest = hashlib.sha256(src + " ".join(cmd).encode() + _cpu_id().encode())
    key = digest.hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"hmst_gemv_{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run(
            cmd + ["-o", tmp],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, path)  # atomic: a concurrent build never loads half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load():
    global _lib, _swiglu
    if _lib is None:
        _lib = False
        cc = shutil.which(os.environ.get("CC", "cc"))
        if os.environ.get("HMST_NATIVE", "1") != "0" and cc:
            try:
                lib = ctypes.CDLL(_build(cc))
                fn, sw = lib.hmst_gemv, lib.hmst_swiglu
                fn.restype = sw.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
                sw.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2
                _lib, _swiglu = fn, sw
            except (OSError, AttributeError, subprocess.SubprocessError):
                pass  # no native kernel: callers use PyTorch
    return _lib


def available() -> bool:
    return bool(_load())


def gemv(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` for 1 <= M <= 4 rows: fp32 CPU tensors, x and w contiguous
    (checked), w row-major (out, in); RuntimeError unless `available()`."""
    rows, n_in = x_MI.shape
    if not (
        1 <= rows <= MAX_ROWS
        and w_OI.shape[1] == n_in
        and x_MI.dtype == w_OI.dtype == torch.float32
        and x_MI.device.type == w_OI.device.type == "cpu"
        and x_MI.is_contiguous()
        and w_OI.is_contiguous()
    ):
        raise ValueError(
            "gemv needs 1-4 contiguous fp32 CPU rows and a contiguous (out, in) weight"
        )
    if not _load():
        raise RuntimeError("the native gemv kernel is not available on this machine")
    return gemv_unchecked(x_MI, w_OI)


def gemv_unchecked(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """`gemv` without its checks (they cost more than the call: ~2 of ~3 us), for
    callers that guarantee them, as `small_matmul` does; the kernel must be loaded."""
    y_MO = torch.empty(x_MI.shape[0], w_OI.shape[0])
    _lib(w_OI.data_ptr(), x_MI.data_ptr(), y_MO.data_ptr(), *w_OI.shape, len(x_MI))
    return y_MO


def swiglu(
    x_D: torch.Tensor, w13_FD: torch.Tensor, w2_DF: torch.Tensor
) -> torch.Tensor:
    """One token through a SwiGLU expert (`hmst.models.layers.SwiGLU`: gate and up are
    the halves of x @ w13.T): `w2 @ (silu(gate) * up)`, shape (D,). fp32 CPU,
    contiguous, checked; RuntimeError unless `available()`."""
    d = x_D.numel()
    two_f = w13_FD.shape[0]
    if not (
        two_f % 2 == 0
        and w13_FD.shape == (two_f, d)
        and w2_DF.shape == (d, two_f // 2)
        and x_D.dtype == w13_FD.dtype == w2_DF.dtype == torch.float32
        and all(
            t.device.type == "cpu" and t.is_contiguous() for t in (x_D, w13_FD, w2_DF)
        )
    ):
        raise ValueError(
            "swiglu needs contiguous fp32 CPU x (D,), w13 (2F, D), w2 (D, F)"
        )
    if not _load():
        raise RuntimeError("the native gemv kernel is not available on this machine")
    return swiglu_unchecked(x_D, w13_FD, w2_DF)


def swiglu_unchecked(x_D, w13_FD, w2_DF) -> torch.Tensor:
    """`swiglu` without its checks, for callers that guarantee them."""
    d, two_f = w2_DF.shape[0], w13_FD.shape[0]
    h, y = torch.empty(two_f), torch.empty(d)
    _swiglu(
        w13_FD.data_ptr(), w2_DF.data_ptr(), x_D.data_ptr(), h.data_ptr(),
        y.data_ptr(), d, two_f // 2,
    )  # fmt: skip
    return y
