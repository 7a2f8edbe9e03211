"""Reference rows: the same transfer done by a plain C ring between two threads.

Two threads on the two cores, a ring of the same capacity as ivclip's,
spinning on acquire/release indices; no Python, no validation, no checks.
The two-copy ring does one memcpy in and one memcpy out per chunk: the
ceiling any ring that copies in and out can reach here.  The one-copy ring
does the memcpy in and checks the stamps at both ends of the chunk in place,
as the zero-copy rows (ivclip's and iceoryx2's) do: the ceiling of any
zero-copy transport fed from a prepared buffer.

Built at run time with cffi into a private temporary directory (a C compiler
is needed, as for ``pip install -e .``); when that fails the row says why.
This code is the benchmark's own, not part of ivclip's C layer.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from typing import Any

from bench.harness import Measurement, Spec
from bench.report import CRING, CRING_ONE_COPY

_SOURCE = r"""
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct job { char *ring; size_t ring_size, chunk, chunks; const char *src; size_t src_len;
             char *dst; int one_copy; uint64_t sum; uint64_t head, tail; };

static void *producer(void *arg)
{
    struct job *j = arg;
    uint64_t t = 0;
    size_t per = j->src_len / j->chunk;
    for (size_t i = 0; i < j->chunks; i++) {
        for (unsigned spin = 0;
             t + j->chunk - __atomic_load_n(&j->head, __ATOMIC_ACQUIRE) > j->ring_size; spin++)
            if (spin > (1u << 16))
                sched_yield();  /* only when the other side has lost its core */
        memcpy(j->ring + t % j->ring_size, j->src + (i % per) * j->chunk, j->chunk);
        t += j->chunk;
        __atomic_store_n(&j->tail, t, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void *consumer(void *arg)
{
    struct job *j = arg;
    uint64_t h = 0;
    for (size_t i = 0; i < j->chunks; i++) {
        for (unsigned spin = 0; __atomic_load_n(&j->tail, __ATOMIC_ACQUIRE) == h; spin++)
            if (spin > (1u << 16))
                sched_yield();
        if (j->one_copy) {  /* check in place: the stamps at both ends, as the zero-copy rows do */
            const char *at = j->ring + h % j->ring_size;
            uint64_t first, last;
            memcpy(&first, at, 8);
            memcpy(&last, at + j->chunk - 8, 8);
            j->sum += first ^ last;
        } else {
            memcpy(j->dst, j->ring + h % j->ring_size, j->chunk);
        }
        h += j->chunk;
        __atomic_store_n(&j->head, h, __ATOMIC_RELEASE);
    }
    return NULL;
}

int bench_cring(size_t ring_size, size_t chunk, size_t chunks, const char *src, size_t src_len,
                char *dst, int one_copy)
{
    struct job j = { NULL, ring_size - ring_size % chunk, chunk, chunks, src, src_len, dst, one_copy,
                     0, 0, 0 };
    pthread_t a, b;
    j.ring = aligned_alloc(4096, ring_size);
    if (j.ring == NULL)
        return -1;
    memset(j.ring, 0, ring_size);
    pthread_create(&b, NULL, consumer, &j);
    pthread_create(&a, NULL, producer, &j);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    free(j.ring);
    return 0;
}
"""

_lib: Any = None
_why: str | None = None


def _build() -> Any:
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    tmp = tempfile.mkdtemp(prefix="ivclip-bench-cring-")
    try:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef("int bench_cring(size_t, size_t, size_t, const char *, size_t, char *, int);")
        ffi.set_source("_ivclip_bench_cring", _SOURCE, extra_compile_args=["-O2", "-pthread"],
                       extra_link_args=["-pthread"])
        path = ffi.compile(tmpdir=tmp, verbose=False)
        spec = importlib.util.spec_from_file_location("_ivclip_bench_cring", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_ivclip_bench_cring"] = module
        spec.loader.exec_module(module)
        _lib = module
    except Exception as exc:  # no compiler, no headers...: report, do not fail the run
        _why = f"could not build the C reference ({type(exc).__name__}: {exc})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _lib


def cring_row(spec: Spec, ring_size: int, payload: bytearray, *, one_copy: bool = False) -> Measurement:
    result = Measurement(CRING_ONE_COPY if one_copy else CRING, spec.size)
    module = _build()
    if module is None:
        result.status = _why or "unavailable"
        return result
    ffi, lib = module.ffi, module.lib
    dst = bytearray(spec.chunk)
    start = time.perf_counter()
    rc = lib.bench_cring(ring_size, spec.chunk, spec.total_chunks, ffi.from_buffer(payload),
                         len(payload), ffi.from_buffer(dst), int(one_copy))
    seconds = time.perf_counter() - start
    if rc:
        result.status = "out of memory"
        return result
    result.payloads = spec.count
    result.seconds = seconds
    return result
