"""cffi build script for ivclip's C layer (API mode, compiled at install time).

The C layer holds only what Python cannot do safely or fast: acquire/release
loads and stores on shared memory, a full fence, and the copies in and out of
the ring.  Every function returns a value or a status; Python turns statuses
into exceptions (see shm/memory.py).

The ``ivc_g_*`` functions are the same accesses made safe against SIGBUS: the
broker maps files that another local process (QEMU's user, with
``--shm-group``) could truncate, and touching a page past the new end of file
raises SIGBUS, which would kill the broker.  A guarded access registers the
mapping it touches in a thread-local slot; the SIGBUS handler jumps back out
of the access when the faulting address lies in that mapping, and the function
returns -1.  Any other SIGBUS is passed on to whatever handler was there
before (by default: the process dies, as it would have without us).
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
int ivc_guard_install(void);
int ivc_g_load_u64(const char *base, size_t size, size_t offset, uint64_t *out);
int ivc_g_load_u32(const char *base, size_t size, size_t offset, uint32_t *out);
int ivc_g_store_u64(char *base, size_t size, size_t offset, uint64_t value);
int ivc_g_store_u32(char *base, size_t size, size_t offset, uint32_t value);
int ivc_g_copy(char *dst, const char *src, size_t n, const char *base, size_t size);
int ivc_g_zero(char *dst, size_t n, const char *base, size_t size);
"""

SOURCE = r"""
#include <setjmp.h>
#include <signal.h>
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

/* SIGBUS-safe accesses ---------------------------------------------------- */

struct ivc_guard {
    sigjmp_buf env;
    const char *lo;
    const char *hi;
};

/* initial-exec: the handler must not make glibc allocate a TLS block. */
static __thread struct ivc_guard *ivc_guard_now __attribute__((tls_model("initial-exec")));
static struct sigaction ivc_prev_bus;
static int ivc_guard_ready;

static void ivc_on_bus(int sig, siginfo_t *info, void *uctx)
{
    struct ivc_guard *g = ivc_guard_now;
    const char *addr = (const char *)info->si_addr;

    if (g != NULL && addr >= g->lo && addr < g->hi) {
        ivc_guard_now = NULL;
        siglongjmp(g->env, 1);
    }
    /* Not one of our guarded accesses: behave as if we were not installed. */
    if (ivc_prev_bus.sa_flags & SA_SIGINFO) {
        if (ivc_prev_bus.sa_sigaction != NULL)
            ivc_prev_bus.sa_sigaction(sig, info, uctx);
    } else if (ivc_prev_bus.sa_handler == SIG_DFL || ivc_prev_bus.sa_handler == SIG_IGN) {
        /* The faulting instruction runs again on return and now gets the
           default action (the kernel forces it for a fault signal). */
        sigaction(SIGBUS, &ivc_prev_bus, NULL);
    } else {
        ivc_prev_bus.sa_handler(sig);
    }
}

int ivc_guard_install(void)
{
    struct sigaction sa;

    if (ivc_guard_ready)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = ivc_on_bus;
    /* SA_NODEFER: SIGBUS stays unblocked while the handler runs, so jumping
       out of it with sigsetjmp(env, 0) (no sigprocmask call per access)
       leaves the signal mask as it was. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &ivc_prev_bus) != 0)
        return -1;
    ivc_guard_ready = 1;
    return 0;
}

#define IVC_GUARD(base, size)                                   \
    struct ivc_guard guard;                                     \
    guard.lo = (base);                                          \
    guard.hi = (base) + (size);                                 \
    if (sigsetjmp(guard.env, 0))                                \
        return -1;                                              \
    ivc_guard_now = &guard;                                     \
    __atomic_signal_fence(__ATOMIC_SEQ_CST)

#define IVC_UNGUARD()                                           \
    __atomic_signal_fence(__ATOMIC_SEQ_CST);                    \
    ivc_guard_now = NULL

int ivc_g_load_u64(const char *base, size_t size, size_t offset, uint64_t *out)
{
    IVC_GUARD(base, size);
    *out = __atomic_load_n((const uint64_t *)(base + offset), __ATOMIC_ACQUIRE);
    IVC_UNGUARD();
    return 0;
}

int ivc_g_load_u32(const char *base, size_t size, size_t offset, uint32_t *out)
{
    IVC_GUARD(base, size);
    *out = __atomic_load_n((const uint32_t *)(base + offset), __ATOMIC_ACQUIRE);
    IVC_UNGUARD();
    return 0;
}

int ivc_g_store_u64(char *base, size_t size, size_t offset, uint64_t value)
{
    IVC_GUARD(base, size);
    __atomic_store_n((uint64_t *)(base + offset), value, __ATOMIC_RELEASE);
    IVC_UNGUARD();
    return 0;
}

int ivc_g_store_u32(char *base, size_t size, size_t offset, uint32_t value)
{
    IVC_GUARD(base, size);
    __atomic_store_n((uint32_t *)(base + offset), value, __ATOMIC_RELEASE);
    IVC_UNGUARD();
    return 0;
}

int ivc_g_copy(char *dst, const char *src, size_t n, const char *base, size_t size)
{
    IVC_GUARD(base, size);
    ivc_copy(dst, src, n);
    IVC_UNGUARD();
    return 0;
}

int ivc_g_zero(char *dst, size_t n, const char *base, size_t size)
{
    IVC_GUARD(base, size);
    memset(dst, 0, n);
    IVC_UNGUARD();
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("shm._ivclip_c", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
