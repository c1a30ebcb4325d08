"""Tests of the ctypes binding; run by tests/it/python.rs with BWRT_LIB set."""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bwrt  # noqa: E402


def naive(a, b, m, n, k):
    return [sum(a[i * k + p] * b[p * n + j] for p in range(k)) for i in range(m) for j in range(n)]


def expect(exc, fn, needle):
    try:
        fn()
    except exc as e:
        assert needle in str(e), f"{e!r} lacks {needle!r}"
        return e
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


def main():
    e = expect(bwrt.BwrtError, lambda: bwrt.load(version=42), "42")
    assert e.status == "UNSUPPORTED_VERSION"
    lib = bwrt.load()
    caps = lib.caps()
    assert caps["dtype_mask"] == 7 and caps["abi_version"] == 1, caps

    e = expect(bwrt.BwrtError, lambda: lib.runtime(workers=0), "config.workers")
    assert e.status == "INVALID_ARGUMENT"
    e = expect(bwrt.BwrtError, lambda: lib.runtime(dtype="I8"), "config.dtype")
    assert e.status == "BAD_DTYPE"
    assert caps["backends"] & 1, caps
    e = expect(bwrt.BwrtError, lambda: lib.runtime(backend="tpu"), "config.backend")
    assert e.status == "INVALID_ARGUMENT"
    # The CUDA backend: present only in a build that has it, on a machine
    # with a device; elsewhere creating it says why.
    if caps["backends"] & 2 and caps["cuda_devices"] > 0:
        with lib.runtime(backend="cuda"):
            pass
    else:
        e = expect(bwrt.BwrtError, lambda: lib.runtime(backend="cuda"), "CUDA")
        assert e.status == "UNAVAILABLE", e.status

    # GEMM waves on every dtype, with shapes that are not tile multiples.
    with lib.runtime(workers=2, tile=(4, 4, 3), swap=(1, 3)) as rt:
        done = lib.semaphore()
        value = 0
        for dtype, tol in (("F32", 1e-5), ("F16", 2e-2), ("BF16", 1e-1)):
            m, n, k = 5, 7, 6
            av = [((i * 7) % 11) / 11 - 0.5 for i in range(m * k)]
            bv = [((i * 5) % 13) / 13 - 0.5 for i in range(k * n)]
            a, b = bwrt.Matrix(m, k, av, dtype), bwrt.Matrix(k, n, bv, dtype)
            c = bwrt.Matrix(m, n, dtype="F32")
            value += 1
            rt.submit_gemm(a, b, c, done, value)
            done.wait(value)
            want = naive(a.tolist(), b.tolist(), m, n, k)
            for g, w in zip(c.tolist(), want):
                assert abs(g - w) <= tol, (dtype, g, w)
        # Shape errors name the field.
        e = expect(bwrt.BwrtError, lambda: rt.submit_gemm(
            bwrt.Matrix(2, 3), bwrt.Matrix(4, 2), bwrt.Matrix(2, 2)), "b.shape[0]")
        assert e.status == "BAD_SHAPE"
        # Timeouts: poll and bounded.
        expect(bwrt.Timeout, lambda: done.wait(value + 1, 0), "semaphore value")
        expect(bwrt.Timeout, lambda: done.wait(value + 1, 1_000_000), "1000000 ns")
        # Index 3: the window [1, 3) has closed.
        expect(bwrt.OutsideSwapWindow, lambda: rt.set_weights(0, bwrt.Matrix(1, 1, [1])), "closed")
        s = rt.sample()
        assert s["waves_completed"] == 3 and s["swap_window_violations"] == 1, s
        assert s["flops"] == 3 * 2 * 5 * 7 * 6, s

    # Swaps: queued before the window, applied when it opens.
    with lib.runtime(workers=1, tile=(2, 2, 2), swap=(1, 2)) as rt:
        assert rt.set_weights(0, bwrt.Matrix(1, 1, [3]), queue=True) == "queued"
        done = lib.semaphore()
        one = bwrt.Matrix(1, 1, [1])
        rt.submit_gemm(one, one, bwrt.Matrix(1, 1), done, 1)
        done.wait(1)
        c = bwrt.Matrix(1, 1)
        rt.submit_gemm(bwrt.Matrix(1, 1, [2]), None, c, done, 2, weight_slot=0)
        done.wait(2)
        assert c.tolist() == [6.0], c.tolist()
        assert rt.sample()["swaps_applied"] == 1

    # An mbarrier across threads.
    mb = lib.mbarrier(3)
    phases = []

    def worker():
        p = mb.arrive()
        mb.wait(p)
        phases.append(p)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert phases == [0, 0, 0], phases
    mb.close()
    print("test_bwrt.py: ok")


if __name__ == "__main__":
    main()
