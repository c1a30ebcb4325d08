"""bwrt from Python, through the C ABI with ctypes (no build step).

Load the shared library (``libbwrt.so``; the path comes from the argument,
else ``$BWRT_LIB``, else the directory of this file), negotiate the ABI with
``bwrt_get_api(BWRT_ABI_VERSION)`` and call the function table it returns::

    import bwrt
    lib = bwrt.load()
    rt = lib.runtime(workers=2, tile=(64, 64, 256))
    a = bwrt.Matrix(2, 3, [1, 2, 3, 4, 5, 6])
    b = bwrt.Matrix(3, 1, [1, 1, 1])
    c = bwrt.Matrix(2, 1)
    done = lib.semaphore()
    rt.submit_gemm(a, b, c, done, 1)
    done.wait(1)
    assert c.tolist() == [6.0, 15.0]

Every failing call raises ``BwrtError`` with the status name and the
library's message (``Timeout`` and ``OutsideSwapWindow`` are subclasses).
Matrices handed to a wave must stay alive until its semaphore is signalled:
keep a reference (``Runtime.submit_gemm`` keeps one until ``wait``).
"""

import ctypes as C
import os
import struct

ABI_VERSION = 1
DEVICE_CPU = 1
WAVE_BLOCK_WHEN_FULL = 1
WAVE_B_FROM_WEIGHTS = 2
SWAP_QUEUE = 1
FOREVER = 2**64 - 1

STATUS = [
    "OK", "INVALID_ARGUMENT", "NULL_POINTER", "BAD_STRUCT_SIZE",
    "UNSUPPORTED_VERSION", "BAD_DTYPE", "BAD_SHAPE", "BUSY", "TIMEOUT",
    "OUTSIDE_SWAP_WINDOW", "WAVE_FAILED", "INTERNAL", "UNAVAILABLE", "DEVICE_ERROR",
]
DTYPES = {"F32": 0, "F16": 1, "BF16": 2}
BACKENDS = {"cpu": 0, "cuda": 1}


class BwrtError(Exception):
    """A call returned a status other than OK."""

    def __init__(self, status, message):
        self.status = STATUS[status] if 0 <= status < len(STATUS) else str(status)
        self.message = message
        super().__init__(f"{self.status}: {message}")


class Timeout(BwrtError):
    """A wait ran out of time."""


class OutsideSwapWindow(BwrtError):
    """A weight swap was refused outside the swap window."""


class Busy(BwrtError):
    """The command ring is full."""


class _Device(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class _Tensor(C.Structure):
    _fields_ = [
        ("struct_size", C.c_uint32), ("dtype", C.c_uint32), ("data", C.c_void_p),
        ("byte_offset", C.c_uint64), ("ndim", C.c_int32), ("device", _Device),
        ("shape", C.POINTER(C.c_int64)), ("strides", C.POINTER(C.c_int64)),
    ]


class _RuntimeConfig(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in
                ("struct_size", "workers", "ring_depth", "dtype", "bm", "bn", "bk", "flags")] + [
        ("swap_begin", C.c_uint64), ("swap_end", C.c_uint64),
        ("backend", C.c_uint32), ("device", C.c_uint32)]


class _WaveDesc(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in ("struct_size", "flags", "weight_slot", "reserved")]


_COUNTERS = [
    "waves_submitted", "waves_completed", "waves_failed", "ring_occupancy",
    "ring_depth", "active_ops", "bytes", "flops", "busy_ns",
    "swap_window_violations", "swaps_applied", "swaps_pending",
]


class _Counters(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("reserved", C.c_uint32)] + [
        (n, C.c_uint64) for n in _COUNTERS]


class _Caps(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in (
        "struct_size", "abi_version", "backend", "dtype_mask", "max_workers",
        "max_ring_depth", "max_tile", "features", "backends", "cuda_devices")]


_S = C.c_int32
_P = C.c_void_p
_T = C.POINTER(_Tensor)


class _Api(C.Structure):
    _fields_ = [
        ("struct_size", C.c_uint32), ("abi_version", C.c_uint32),
        ("last_error", C.CFUNCTYPE(_S, C.c_char_p, C.c_size_t)),
        ("get_caps", C.CFUNCTYPE(_S, C.POINTER(_Caps))),
        ("runtime_create", C.CFUNCTYPE(_S, C.POINTER(_RuntimeConfig), C.POINTER(_P))),
        ("runtime_destroy", C.CFUNCTYPE(_S, _P)),
        ("submit_wave", C.CFUNCTYPE(_S, _P, C.POINTER(_WaveDesc), _T, _T, _T, _P, C.c_uint64)),
        ("set_weights", C.CFUNCTYPE(_S, _P, C.c_uint32, _T, C.c_uint32, C.POINTER(C.c_uint32))),
        ("sample", C.CFUNCTYPE(_S, _P, C.POINTER(_Counters))),
        ("semaphore_create", C.CFUNCTYPE(_S, C.c_uint64, C.POINTER(_P))),
        ("semaphore_destroy", C.CFUNCTYPE(_S, _P)),
        ("semaphore_signal", C.CFUNCTYPE(_S, _P, C.c_uint64)),
        ("semaphore_wait", C.CFUNCTYPE(_S, _P, C.c_uint64, C.c_uint64)),
        ("semaphore_query", C.CFUNCTYPE(_S, _P, C.POINTER(C.c_uint64))),
        ("mbarrier_create", C.CFUNCTYPE(_S, C.c_uint64, C.POINTER(_P))),
        ("mbarrier_destroy", C.CFUNCTYPE(_S, _P)),
        ("mbarrier_arrive", C.CFUNCTYPE(_S, _P, C.c_uint64, C.POINTER(C.c_uint64))),
        ("mbarrier_wait", C.CFUNCTYPE(_S, _P, C.c_uint64, C.c_uint64)),
    ]


def _bf16_bits(x):
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


class Matrix:
    """A row-major matrix in memory the library can read and write."""

    def __init__(self, rows, cols, values=None, dtype="F32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.rows, self.cols, self.dtype = rows, cols, dtype
        self.itemsize = 4 if dtype == "F32" else 2
        self.buf = C.create_string_buffer(max(1, rows * cols * self.itemsize))
        self._shape = (C.c_int64 * 2)(rows, cols)
        if values is not None:
            values = list(values)
            if len(values) != rows * cols:
                raise ValueError(f"{len(values)} values for a {rows} x {cols} matrix")
            for i, v in enumerate(values):
                self._put(i, float(v))

    def _put(self, i, v):
        at = i * self.itemsize
        if self.dtype == "F32":
            struct.pack_into("<f", self.buf, at, v)
        elif self.dtype == "F16":
            struct.pack_into("<e", self.buf, at, v)
        else:
            struct.pack_into("<H", self.buf, at, _bf16_bits(v))

    def tolist(self):
        """The elements, row-major, as Python floats."""
        out = []
        for i in range(self.rows * self.cols):
            at = i * self.itemsize
            if self.dtype == "F32":
                out.append(struct.unpack_from("<f", self.buf, at)[0])
            elif self.dtype == "F16":
                out.append(struct.unpack_from("<e", self.buf, at)[0])
            else:
                bits = struct.unpack_from("<H", self.buf, at)[0] << 16
                out.append(struct.unpack("<f", struct.pack("<I", bits))[0])
        return out

    def _desc(self, **overrides):
        t = _Tensor(
            struct_size=C.sizeof(_Tensor), dtype=DTYPES[self.dtype],
            data=C.cast(self.buf, C.c_void_p), byte_offset=0, ndim=2,
            device=_Device(DEVICE_CPU, 0), shape=self._shape, strides=None)
        for k, v in overrides.items():
            setattr(t, k, v)
        return t


class Library:
    """The loaded library and its negotiated function table."""

    def __init__(self, path=None, version=ABI_VERSION):
        if path is None:
            path = os.environ.get("BWRT_LIB") or os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "libbwrt.so")
        self.dll = C.CDLL(path)
        get_api = self.dll.bwrt_get_api
        get_api.restype = C.POINTER(_Api)
        get_api.argtypes = [C.c_uint32]
        table = get_api(version)
        if not table:
            raise self._error(STATUS.index("UNSUPPORTED_VERSION"))
        self.api = table.contents
        if self.api.abi_version != version:
            raise BwrtError(STATUS.index("UNSUPPORTED_VERSION"),
                            f"asked for ABI {version}, got {self.api.abi_version}")

    def _error(self, status):
        last_error = getattr(self, "api", None)
        buf = C.create_string_buffer(1024)
        if last_error is not None:
            self.api.last_error(buf, len(buf))
        else:
            fn = self.dll.bwrt_last_error
            fn.argtypes = [C.c_char_p, C.c_size_t]
            fn(buf, len(buf))
        message = buf.value.decode("utf-8", "replace")
        name = STATUS[status] if 0 <= status < len(STATUS) else ""
        cls = {"TIMEOUT": Timeout, "OUTSIDE_SWAP_WINDOW": OutsideSwapWindow,
               "BUSY": Busy}.get(name, BwrtError)
        return cls(status, message)

    def check(self, status):
        """Raises the matching BwrtError unless `status` is OK."""
        if status != 0:
            raise self._error(status)

    def caps(self):
        """The library's capabilities, as a dict."""
        caps = _Caps(struct_size=C.sizeof(_Caps))
        self.check(self.api.get_caps(C.byref(caps)))
        return {name: getattr(caps, name) for name, _ in _Caps._fields_[1:]}

    def runtime(self, workers=2, ring_depth=64, tile=(64, 64, 256),
                swap=(0, 2**64 - 1), dtype="F32", backend="cpu", device=0):
        """A new Runtime; `swap` is the window [swap_begin, swap_end);
        `backend` is "cpu" or "cuda" (see caps()["backends"])."""
        return Runtime(self, workers, ring_depth, tile, swap, dtype, backend, device)

    def semaphore(self, initial=0):
        """A new timeline Semaphore."""
        return Semaphore(self, initial)

    def mbarrier(self, expected):
        """A new MBarrier whose phases complete after `expected` arrivals."""
        return MBarrier(self, expected)


class _Handle:
    def __init__(self, lib):
        self.lib, self.api, self.h = lib, lib.api, C.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Runtime(_Handle):
    """Worker threads and their command ring."""

    def __init__(self, lib, workers, ring_depth, tile, swap, dtype, backend="cpu", device=0):
        super().__init__(lib)
        cfg = _RuntimeConfig(
            struct_size=C.sizeof(_RuntimeConfig), workers=workers,
            ring_depth=ring_depth, dtype=DTYPES.get(dtype, 99), bm=tile[0],
            bn=tile[1], bk=tile[2], flags=0, swap_begin=swap[0], swap_end=swap[1],
            backend=BACKENDS.get(backend, 99), device=device)
        lib.check(self.api.runtime_create(C.byref(cfg), C.byref(self.h)))
        self._inflight = []

    def submit_gemm(self, a, b, c, semaphore=None, value=0, block=False, weight_slot=None):
        """Submits C = A · B; B may be None with `weight_slot` set."""
        flags = (WAVE_BLOCK_WHEN_FULL if block else 0) | (
            WAVE_B_FROM_WEIGHTS if weight_slot is not None else 0)
        desc = _WaveDesc(struct_size=C.sizeof(_WaveDesc), flags=flags,
                         weight_slot=weight_slot or 0, reserved=0)
        ta, tc = a._desc(), c._desc()
        tb = b._desc() if b is not None else None
        self.lib.check(self.api.submit_wave(
            self.h, C.byref(desc), C.byref(ta), C.byref(tb) if tb is not None else None,
            C.byref(tc), semaphore.h if semaphore is not None else None, value))
        self._inflight.append((a, b, c))

    def set_weights(self, slot, weights, queue=False):
        """Swaps weight `slot`; returns "applied" or "queued"."""
        outcome = C.c_uint32()
        t = weights._desc()
        self.lib.check(self.api.set_weights(
            self.h, slot, C.byref(t), SWAP_QUEUE if queue else 0, C.byref(outcome)))
        return "queued" if outcome.value == 1 else "applied"

    def sample(self):
        """The counters, as a dict."""
        c = _Counters(struct_size=C.sizeof(_Counters))
        self.lib.check(self.api.sample(self.h, C.byref(c)))
        return {name: getattr(c, name) for name in _COUNTERS}

    def close(self):
        """Drains the ring and joins the workers."""
        if self.h:
            self.lib.check(self.api.runtime_destroy(self.h))
            self.h = C.c_void_p()
            self._inflight = []


class Semaphore(_Handle):
    """A timeline semaphore."""

    def __init__(self, lib, initial=0):
        super().__init__(lib)
        lib.check(self.api.semaphore_create(initial, C.byref(self.h)))

    def signal(self, value):
        """Sets the value (never lower)."""
        self.lib.check(self.api.semaphore_signal(self.h, value))

    def wait(self, value, timeout_ns=FOREVER):
        """Waits for `value`; 0 polls; raises Timeout."""
        self.lib.check(self.api.semaphore_wait(self.h, value, timeout_ns))

    @property
    def value(self):
        """The current value."""
        v = C.c_uint64()
        self.lib.check(self.api.semaphore_query(self.h, C.byref(v)))
        return v.value

    def close(self):
        """Releases the handle."""
        if self.h:
            self.lib.check(self.api.semaphore_destroy(self.h))
            self.h = C.c_void_p()


class MBarrier(_Handle):
    """A phased barrier with an expected arrival count."""

    def __init__(self, lib, expected):
        super().__init__(lib)
        lib.check(self.api.mbarrier_create(expected, C.byref(self.h)))

    def arrive(self, count=1):
        """Records arrivals; returns their phase."""
        phase = C.c_uint64()
        self.lib.check(self.api.mbarrier_arrive(self.h, count, C.byref(phase)))
        return phase.value

    def wait(self, phase, timeout_ns=FOREVER):
        """Waits until `phase` has completed."""
        self.lib.check(self.api.mbarrier_wait(self.h, phase, timeout_ns))

    def close(self):
        """Releases the handle."""
        if self.h:
            self.lib.check(self.api.mbarrier_destroy(self.h))
            self.h = C.c_void_p()


def load(path=None, version=ABI_VERSION):
    """Loads the library and negotiates ABI `version`."""
    return Library(path, version)
