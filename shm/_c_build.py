"""cffi build script for ivclip's C layer (API mode, compiled at install time).

The C layer holds only what Python cannot do safely or fast: acquire/release
loads and stores on shared memory, a full fence, and the copies in and out of
the ring.  Every function returns a value or a status; Python turns statuses
into exceptions (see shm/atomics.py).
"""

from cffi import FFI

CDEF = """
uint64_t ivc_load_acquire_u64(const char *base, size_t offset);
uint32_t ivc_load_acquire_u32(const char *base, size_t offset);
void ivc_store_release_u64(char *base, size_t offset, uint64_t value);
void ivc_store_release_u32(char *base, size_t offset, uint32_t value);
void ivc_fence(void);
void ivc_copy(char *dst, const char *src, size_t n);
void ivc_copy_plain(char *dst, const char *src, size_t n);
void ivc_zero(char *dst, size_t n);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Offsets are checked by the Python callers against the mapped size; the C
   side trusts them so that it stays a handful of instructions. */

uint64_t ivc_load_acquire_u64(const char *base, size_t offset)
{
    return __atomic_load_n((const uint64_t *)(base + offset), __ATOMIC_ACQUIRE);
}

uint32_t ivc_load_acquire_u32(const char *base, size_t offset)
{
    return __atomic_load_n((const uint32_t *)(base + offset), __ATOMIC_ACQUIRE);
}

void ivc_store_release_u64(char *base, size_t offset, uint64_t value)
{
    __atomic_store_n((uint64_t *)(base + offset), value, __ATOMIC_RELEASE);
}

void ivc_store_release_u32(char *base, size_t offset, uint32_t value)
{
    __atomic_store_n((uint32_t *)(base + offset), value, __ATOMIC_RELEASE);
}

void ivc_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* glibc's memcpy takes its `rep movsb` path for blocks of roughly 32-128 KiB,
   which runs several times slower on the CPUs these VMs run on than its vector
   loop on 4 KiB blocks.  Copies in that band are split into 4 KiB pieces;
   smaller and larger copies go straight to memcpy. */
#define IVC_SLOW_LOW   (16u * 1024u)
#define IVC_SLOW_HIGH  (256u * 1024u)
#define IVC_PIECE      4096u

void ivc_copy(char *dst, const char *src, size_t n)
{
    if (n < IVC_SLOW_LOW || n >= IVC_SLOW_HIGH) {
        memcpy(dst, src, n);
        return;
    }
    while (n >= IVC_PIECE) {
        memcpy(dst, src, IVC_PIECE);
        dst += IVC_PIECE;
        src += IVC_PIECE;
        n -= IVC_PIECE;
    }
    memcpy(dst, src, n);
}

void ivc_copy_plain(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
}

void ivc_zero(char *dst, size_t n)
{
    /* Volatile-free but not elidable: the destination is shared memory or a
       buffer Python still references. */
    memset(dst, 0, n);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("shm._ivclip_c", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
