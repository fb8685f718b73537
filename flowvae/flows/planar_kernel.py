"""K planar layers on the CPU in compiled C (planar_cpu.c), as one autograd node.

In eager PyTorch a planar layer is a few tiny kernel launches per step, each costing more in
dispatch than in arithmetic at the batch sizes of the paper's VAE; the C loop does the same
maths one row at a time for the price of the multiply-adds. The C file is built on first use
with the system's C compiler (``$CC``, else ``cc``; half a second) into a per-user cache,
``$FLOWVAE_CACHE`` or ``~/.cache/flowvae``, and loaded with ctypes: no build step at install
time and nothing to install.

Where no compiler is found, the build fails, or ``FLOWVAE_PLANAR_KERNEL=0`` is set, planar
stacks run on the pure-PyTorch path (planar_stack.py) instead; ``status()`` says which and
why. Shapes and maths are those of planar_stack.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from flowvae.flows.planar_fused import refuse_double_backward

SOURCE = Path(__file__).with_name("planar_cpu.c")
#: Portable code for the machine's architecture (no -march=native: a cache in a shared home
#: directory may be loaded on another CPU model).
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno")
ABI_VERSION = 1
DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_lib: ctypes.CDLL | None = None
_status: str | None = None


def cache_dir() -> Path:
    """Where the built library lives: $FLOWVAE_CACHE, else $XDG_CACHE_HOME/flowvae, else
    ~/.cache/flowvae."""
    if os.environ.get("FLOWVAE_CACHE"):
        return Path(os.environ["FLOWVAE_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "flowvae"


def _compiler() -> list[str] | None:
    """The compiler command: $CC (split like a shell would: "gcc -m64"), else cc, gcc, clang."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
        return [shutil.which(cmd[0]) or cmd[0], *cmd[1:]] if cmd else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def _compile(cc: list[str], lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Built under a unique name beside the final one and renamed: processes starting together
    # (torchrun ranks, parallel tests) never load a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=f"{lib.stem}.", suffix=".tmp.so", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(lib: Path) -> ctypes.CDLL:
    handle = ctypes.CDLL(str(lib))
    handle.planar_abi_version.restype = ctypes.c_int64
    if handle.planar_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{lib} has ABI version {handle.planar_abi_version()}")
    i64, ptr, f64, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for suffix in DTYPES.values():
        prep = getattr(handle, f"planar_prep_{suffix}")
        prep.argtypes = [i64] * 3 + [ptr, c_int, f64, f64] + [ptr] * 6
        getattr(handle, f"planar_forward_{suffix}").argtypes = [i64] * 4 + [ptr] * 9
        backward = getattr(handle, f"planar_backward_{suffix}")
        backward.argtypes = [i64] * 4 + [ptr] * 10 + [c_int, f64, ptr, ptr]
        backward.restype = c_int
    return handle


def library_path(cc: list[str]) -> Path:
    """The cached build for this source, compiler, flags and platform."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((cc, FLAGS, platform.machine(), sys.platform)).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"planar_cpu-{key}.so"


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc/clang)")
    lib = library_path(cc)
    if lib.exists():
        try:
            return _load(lib)
        except (OSError, AttributeError, RuntimeError):
            pass  # truncated, foreign or stale: build it again
    _compile(cc, lib)
    return _load(lib)


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None when it is switched off or cannot be built."""
    global _lib, _status
    if _status is None:
        if os.environ.get("FLOWVAE_PLANAR_KERNEL", "1").strip().lower() in ("0", "false", "no"):
            _status = "off (FLOWVAE_PLANAR_KERNEL=0)"
        else:
            try:
                _lib = _build()
                _status = "compiled C"
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
                _status = f"unavailable ({err})"
    return _lib


def status() -> str:
    """'compiled C', or why planar stacks on the CPU use the PyTorch path."""
    library()
    return _status or ""


def _fits(z: Tensor, params: Tensor) -> bool:
    return (
        z.device.type == params.device.type == "cpu"
        and z.layout == params.layout == torch.strided
        and z.dtype in DTYPES
        and params.dtype == z.dtype
        and z.dim() == 2
        and params.dim() == 3
        and params.shape[0] in (1, z.shape[0])
        and params.shape[2] == 2 * z.shape[1] + 1
    )


def usable(z: Tensor, params: Tensor) -> bool:
    """The kernel takes this call: CPU float32/float64 tensors of one dtype and fitting shapes."""
    return _fits(z, params) and library() is not None


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class PlanarKernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, params: Tensor, scaled: bool, slack: float, shift: float, keep):
        lib, suffix = _lib, DTYPES[z.dtype]
        z, params = z.contiguous(), params.contiguous()
        (b, d), (p, k) = z.shape, params.shape[:2]
        new = dict(dtype=z.dtype, device=z.device)
        uhat = torch.empty(p, k, d, **new)
        s, c, wsq, wu, off = torch.empty(5, p, k, **new).unbind(0)
        getattr(lib, f"planar_prep_{suffix}")(
            p, k, d, _p(params), int(scaled), slack, shift, *map(_p, (uhat, s, c, wsq, wu, off))
        )
        y, ld = torch.empty(b, d, **new), torch.empty(b, **new)
        zs = torch.empty(b, k, d, **new) if keep else None
        t = torch.empty(b, k, **new) if keep else None
        getattr(lib, f"planar_forward_{suffix}")(
            b, p, k, d, *map(_p, (z, params, uhat, s, off, y, ld, zs, t))
        )
        if keep:
            ctx.scaled, ctx.shift = scaled, shift
            ctx.save_for_backward(params, uhat, s, c, wsq, wu, zs, t)
        return y, ld

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        params, uhat, s, c, wsq, wu, zs, t = ctx.saved_tensors
        g_y, g_ld = g_y.contiguous(), g_ld.contiguous()
        (b, d), (p, k) = g_y.shape, params.shape[:2]
        g_z, g_params = torch.empty_like(g_y), torch.empty_like(params)
        code = getattr(_lib, f"planar_backward_{DTYPES[g_y.dtype]}")(
            b,
            p,
            k,
            d,
            *map(_p, (g_y, g_ld, zs, t, params, uhat, s, c, wsq, wu)),
            int(ctx.scaled),
            ctx.shift,
            _p(g_z),
            _p(g_params),
        )
        if code != 0:
            raise MemoryError("planar kernel: out of memory in the backward pass")
        return g_z, g_params, None, None, None, None


# torch.compile runs it as it is, between compiled graphs (dynamo cannot trace a ctypes call).
@torch.compiler.disable
def planar_kernel_forward(
    z: Tensor, params: Tensor, scaled_offset: bool, slack: float, shift: float = 0.0
) -> tuple[Tensor, Tensor]:
    """z_K and Σ_k log|det J_k| of K planar layers (see ``usable`` for when it applies).

    ``params`` (B|1, K, 2D + 1) holds each layer's [u, w, b] as in the flat amortised layout.
    """
    if not _fits(z, params):
        raise ValueError(
            "planar kernel: expected CPU float32/float64 z (B, D) and params (B or 1, K, 2D + 1) "
            f"of one dtype, got z {tuple(z.shape)} {z.dtype} {z.device}, "
            f"params {tuple(params.shape)} {params.dtype} {params.device}"
        )
    if library() is None:
        raise RuntimeError(f"the planar CPU kernel is {status()}")
    keep = torch.is_grad_enabled() and (z.requires_grad or params.requires_grad)
    return PlanarKernelFunction.apply(z, params, scaled_offset, slack, shift, keep)
