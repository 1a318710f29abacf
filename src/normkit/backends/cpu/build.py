"""Compile the C kernels on first use and cache the shared library across processes.

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) as
``-O3 -march=native -fopenmp``: native vector width matters more than anything else for a
memory-bound kernel, and OpenMP shares the libgomp that torch's CPU wheels already load, so normkit
and torch use one thread pool. The result goes to ``$NORMKIT_CACHE_DIR`` (default
``~/.cache/normkit``) under a name hashed from the sources, flags, compiler and CPU, so an upgrade,
another compiler or another machine type rebuilds, and every later process just loads it. Building
takes about 10 s on two cores; loading a cached build, a few milliseconds.

Concurrent first uses (pytest-xdist, DDP workers) are safe: each builds into its own temporary file
and renames it into place atomically.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BuildError", "cache_dir", "library_path", "load_library"]

_SOURCES = ("kernels.c", "kernels_impl.h", "channel_rows_impl.h", "entry_points_impl.h")
_SOURCE_DIR = Path(__file__).with_name("csrc")
# gnu11: a*b+c may fuse into an FMA; no errno and no FP traps: both would block vectorizing exp and
# the selects (results are unchanged: normkit never reads errno or FP exception flags)
_BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math"]
_NATIVE_FLAGS = ["-march=native"]


class BuildError(ImportError):
    """The kernels could not be compiled (no C compiler, or it failed): the backend is unavailable."""


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``$NORMKIT_CACHE_DIR``, else ``~/.cache/normkit``."""
    env = os.environ.get("NORMKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normkit"


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate
    raise BuildError("normkit's cpu backend needs a C compiler (set CC, or install gcc or clang)")


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags: a -march=native build must not be shared by two
    machines whose model strings agree but whose vector extensions differ (SIGILL)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in found:
                    found[key] = line
    except OSError:
        pass
    return "".join(found.values()) or platform.processor()


def _fingerprint(cc: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_SOURCE_DIR / name).read_bytes())
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True).stdout
    for part in (" ".join(flags), version, platform.machine(), _cpu_model()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile(cc: str, flags: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cc.split(), *flags, str(_SOURCE_DIR / "kernels.c"), "-o", str(out), "-lm"],
        capture_output=True,
        text=True,
    )


def library_path() -> Path:
    """Path of the compiled library for this machine, building it if it is not cached yet."""
    cc = _compiler()
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    last_error = ""
    # -march=native first; a compiler that rejects it (some cross toolchains) gets portable code
    for flags in (_BASE_FLAGS + _NATIVE_FLAGS, _BASE_FLAGS):
        target = directory / f"normkit_kernels-{_fingerprint(cc, flags)}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            result = _compile(cc, flags, Path(tmp))
            if result.returncode == 0:
                os.chmod(tmp, 0o755)  # mkstemp makes it private; a shared cache must be readable
                os.replace(tmp, target)
                return target
            last_error = result.stderr
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BuildError(f"compiling normkit's cpu kernels with {cc} failed:\n{last_error[-2000:]}")


def load_library() -> ctypes.CDLL:
    """The kernels as a ctypes library (compiled on first use). Import torch before calling this, so
    that the library binds to the OpenMP runtime torch already loaded."""
    import torch  # noqa: F401  (torch's libgomp first)

    try:
        return ctypes.CDLL(str(library_path()))
    except OSError as exc:  # an unwritable cache directory, a truncated library, a noexec mount
        raise BuildError(f"normkit's cpu kernels could not be built or loaded: {exc}") from exc
