"""cffi build script for ivclip's C layer (API mode, compiled at install time).

The C layer holds only what Python cannot do safely or fast: acquire/release
loads and stores on shared memory, a full fence, the copies in and out of the
ring, and one batch routine per ring end that moves many small records per
call.  Every function returns a value or a status; Python turns statuses into
exceptions (shm/memory.py, shm/ring.py).

The two batch routines are the ring logic of shm/ring.py written a second
time, line for line, so that a batch of 64-byte records costs one call instead
of several Python statements per record.  tests/test_ring_zero_copy.py checks
that both versions lay out the same bytes and accept or reject the same
hostile input.  Keep them in step: a change to `RingProducer._reserve`,
`try_push` or `RingConsumer._next` must be made here too.

The ``ivc_g_*`` functions are the same accesses made safe against SIGBUS: the
broker maps files that another local process (QEMU's user, with
``--shm-group``) could truncate, and touching a page past the new end of file
raises SIGBUS, which would kill the broker.  A guarded access registers the
mapping it touches in a thread-local slot; the SIGBUS handler jumps back out
of the access when the faulting address lies in that mapping, and the function
returns -1.  Any other SIGBUS is passed on to whatever handler was there
before (by default: the process dies, as it would have without us).
``ivc_g_copy2`` guards a copy between two such mappings (the broker relays a
file chunk from one VM's ring to another's) and returns -1 or -2 for a fault
in the first or the second.
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
void ivc_copy_pieces(char *dst, const char *src, size_t n);
void ivc_copy_vector(char *dst, const char *src, size_t n);
int ivc_set_copy_strategy(int strategy);
void ivc_zero(char *dst, size_t n);

void ivc_put_record(char *rec, uint32_t length, uint32_t kind, const char *src, size_t n);
size_t ivc_ring_put(char *ring, uint64_t capacity, uint64_t tail, uint64_t head,
                    uint32_t kind, const char *src, size_t src_len,
                    const uint32_t *lengths, size_t count, uint32_t each, uint64_t *out);
int ivc_ring_get(const char *ring, uint64_t capacity, uint64_t max_record,
                 uint64_t head, uint64_t tail, char *dst, size_t dst_len,
                 uint32_t *meta, size_t max_records, uint64_t *out);
int ivc_guard_install(void);
int ivc_g_load_u64(const char *base, size_t size, size_t offset, uint64_t *out);
int ivc_g_load_u32(const char *base, size_t size, size_t offset, uint32_t *out);
int ivc_g_store_u64(char *base, size_t size, size_t offset, uint64_t value);
int ivc_g_store_u32(char *base, size_t size, size_t offset, uint32_t value);
int ivc_g_copy(char *dst, const char *src, size_t n, const char *base, size_t size);
int ivc_g_copy2(char *dst, const char *src, size_t n, const char *base, size_t size,
                const char *base2, size_t size2);
int ivc_g_zero(char *dst, size_t n, const char *base, size_t size);
"""

SOURCE = r"""
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring's record headers are read as one little-endian u64"
#endif

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

/* Copies ------------------------------------------------------------------

   glibc's memcpy takes its `rep movsb` path from 2 KiB up to its non-temporal
   threshold.  On some CPUs (reported on the VM hosts) that path runs about
   12 times slower for 32-128 KiB blocks; on the benchmark machine it does not
   (see `python -m bench`, table "copy strategies").  Three strategies, chosen
   per process with ivc_set_copy_strategy():

     0  glibc memcpy for every size (the default: fastest where measured)
     1  16 KiB .. 256 KiB copies split into 4 KiB memcpy pieces (the old choice)
     2  copies of 2 KiB and more done by a 64-byte vector loop that never
        uses `rep movsb` (SSE2: baseline on x86-64, no run-time dispatch)

   Whichever is chosen, every copy is a plain copy of n bytes: no
   non-temporal stores, since the reader is the other core and wants the
   ring's lines in cache. */
#define IVC_SLOW_LOW   (16u * 1024u)
#define IVC_SLOW_HIGH  (256u * 1024u)
#define IVC_PIECE      4096u
#define IVC_VECTOR_MIN 2048u

static int ivc_strategy = 0;

int ivc_set_copy_strategy(int strategy)
{
    int old = ivc_strategy;
    if (strategy >= 0 && strategy <= 2)
        ivc_strategy = strategy;
    return old;
}

void ivc_copy_plain(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
}

void ivc_copy_pieces(char *dst, const char *src, size_t n)
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

#if defined(__x86_64__)
#include <emmintrin.h>
void ivc_copy_vector(char *dst, const char *src, size_t n)
{
    if (n < IVC_VECTOR_MIN) {
        memcpy(dst, src, n);
        return;
    }
    while (n >= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_storeu_si128((__m128i *)dst, a);
        _mm_storeu_si128((__m128i *)(dst + 16), b);
        _mm_storeu_si128((__m128i *)(dst + 32), c);
        _mm_storeu_si128((__m128i *)(dst + 48), d);
        src += 64;
        dst += 64;
        n -= 64;
    }
    memcpy(dst, src, n);  /* < 64 bytes: never `rep movsb` */
}
#else
void ivc_copy_vector(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
}
#endif

void ivc_copy(char *dst, const char *src, size_t n)
{
    switch (ivc_strategy) {
    case 1: ivc_copy_pieces(dst, src, n); return;
    case 2: ivc_copy_vector(dst, src, n); return;
    default: memcpy(dst, src, n); return;
    }
}

void ivc_zero(char *dst, size_t n)
{
    /* Volatile-free but not elidable: the destination is shared memory or a
       buffer Python still references. */
    memset(dst, 0, n);
}

/* Records -----------------------------------------------------------------

   Layout (shm/ring.py): u32 length, u32 kind, payload, padding to 8 bytes.
   PAD_KIND (0) fills the rest of the ring before a record that would wrap. */
#define IVC_HDR 8u
#define IVC_SPAN(len) (IVC_HDR + (((uint64_t)(len) + 7u) & ~(uint64_t)7u))

static inline void ivc_put_header(char *at, uint32_t length, uint32_t kind)
{
    uint64_t h = (uint64_t)length | ((uint64_t)kind << 32);
    memcpy(at, &h, 8);
}

/* Header and payload of one record at `rec` (inside the ring; checked by Python). */
void ivc_put_record(char *rec, uint32_t length, uint32_t kind, const char *src, size_t n)
{
    ivc_put_header(rec, length, kind);
    ivc_copy(rec + IVC_HDR, src, n);
}

/* Producer batch: append records whose payloads are consecutive slices of
   src (lengths[i] bytes each, or `each` bytes when lengths is NULL, the last
   one shorter), as RingProducer.try_push would one by one with the consumer
   index `head` (validated by the caller, never read here).  Stops at the
   first record that does not fit, writing nothing of it.

   The caller has checked: kind != 0, every length <= max_record, the lengths
   add up to no more than src_len.  Returns the records written;
   out[0] = the new tail, out[1] = bytes of src used. */
/* Indices run modulo the largest multiple of the capacity below 2**64
   (shm.ring.ring_wrap); these two keep that arithmetic free of overflow.
   Both arguments are already below `wrap`. */
static inline uint64_t ivc_wrap(uint64_t capacity)
{
    return (UINT64_MAX / capacity) * capacity;
}

static inline uint64_t ivc_advance(uint64_t index, uint64_t n, uint64_t wrap)
{
    return n >= wrap - index ? n - (wrap - index) : index + n;
}

static inline uint64_t ivc_distance(uint64_t ahead, uint64_t behind, uint64_t wrap)
{
    return ahead >= behind ? ahead - behind : ahead + (wrap - behind);
}

size_t ivc_ring_put(char *ring, uint64_t capacity, uint64_t tail, uint64_t head,
                    uint32_t kind, const char *src, size_t src_len,
                    const uint32_t *lengths, size_t count, uint32_t each, uint64_t *out)
{
    size_t done = 0, used = 0;
    const uint64_t wrap = ivc_wrap(capacity);
    while (done < count) {
        uint32_t length;
        if (lengths != NULL) {
            length = lengths[done];
        } else {
            size_t left = src_len - used;
            length = left < each ? (uint32_t)left : each;
        }
        uint64_t span = IVC_SPAN(length);
        uint64_t pos = tail % capacity;
        uint64_t to_end = capacity - pos;
        uint64_t need = span <= to_end ? span : to_end + span;
        uint64_t free_bytes = capacity - ivc_distance(tail, head, wrap);
        if (need > free_bytes)
            break;
        if (span > to_end) {
            ivc_put_header(ring + pos, (uint32_t)(to_end - IVC_HDR), 0);
            tail = ivc_advance(tail, to_end, wrap);
            pos = 0;
        }
        ivc_put_record(ring + pos, length, kind, src + used, length);
        tail = ivc_advance(tail, span, wrap);
        used += length;
        done++;
    }
    out[0] = tail;
    out[1] = used;
    return done;
}

/* Consumer batch: copy records of [head, tail) out into dst, payloads back
   to back, while they fit in dst and meta; meta gets (kind, length) per
   record.  `tail` is the producer index the caller read once and validated
   (aligned, at most `capacity` ahead).  Each header is read once, with one
   64-bit load, into a local and then checked exactly as RingConsumer._next
   checks it; a peer that rewrites it meanwhile changes nothing here.

   Returns 0 when it stopped cleanly (ring, dst or meta exhausted) and 1 at
   an invalid header, which is left unconsumed.  out[0] = new head,
   out[1] = records, out[2] = payload bytes; on 1, out[3..5] = the bad
   header's position, length and kind. */
int ivc_ring_get(const char *ring, uint64_t capacity, uint64_t max_record,
                 uint64_t head, uint64_t tail, char *dst, size_t dst_len,
                 uint32_t *meta, size_t max_records, uint64_t *out)
{
    size_t done = 0, used = 0;
    int status = 0;
    const uint64_t wrap = ivc_wrap(capacity);
    while (done < max_records) {
        uint64_t available = ivc_distance(tail, head, wrap);
        if (available == 0)
            break;
        uint64_t pos = head % capacity;
        uint64_t h = __atomic_load_n((const uint64_t *)(ring + pos), __ATOMIC_RELAXED);
        uint32_t length = (uint32_t)h;
        uint32_t kind = (uint32_t)(h >> 32);
        if (kind == 0) {
            uint64_t to_end = capacity - pos;
            if ((uint64_t)length != to_end - IVC_HDR || available < to_end) {
                status = 1;
                out[3] = pos; out[4] = length; out[5] = kind;
                break;
            }
            head = ivc_advance(head, to_end, wrap);
            continue;
        }
        uint64_t span = IVC_SPAN(length);
        if ((uint64_t)length > max_record || span > available || pos + span > capacity) {
            status = 1;
            out[3] = pos; out[4] = length; out[5] = kind;
            break;
        }
        if ((size_t)length > dst_len - used)
            break;
        ivc_copy(dst + used, ring + pos + IVC_HDR, length);
        meta[2 * done] = kind;
        meta[2 * done + 1] = length;
        used += length;
        head = ivc_advance(head, span, wrap);
        done++;
    }
    out[0] = head;
    out[1] = done;
    out[2] = used;
    return status;
}

/* SIGBUS-safe accesses ---------------------------------------------------- */

struct ivc_guard {
    sigjmp_buf env;
    const char *lo[2];      /* the guarded mappings; an unused one is [NULL, NULL) */
    const char *hi[2];
};

/* initial-exec: the handler must not make glibc allocate a TLS block. */
static __thread struct ivc_guard *ivc_guard_now __attribute__((tls_model("initial-exec")));
static struct sigaction ivc_prev_bus;
static int ivc_guard_ready;

static void ivc_on_bus(int sig, siginfo_t *info, void *uctx)
{
    struct ivc_guard *g = ivc_guard_now;
    const char *addr = (const char *)info->si_addr;

    if (g != NULL) {
        for (int i = 0; i < 2; i++) {
            if (addr >= g->lo[i] && addr < g->hi[i]) {
                ivc_guard_now = NULL;
                siglongjmp(g->env, i + 1);  /* sigsetjmp returns which mapping faulted */
            }
        }
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

static inline void ivc_guard_range(struct ivc_guard *g, int i, const char *base, size_t size)
{
    g->lo[i] = base;
    g->hi[i] = base != NULL ? base + size : NULL;
}

/* Returns -1 from the function on a fault in [base, base + size), -2 on one in
   [base2, base2 + size2). */
#define IVC_GUARD2(base, size, base2, size2)                    \
    struct ivc_guard guard;                                     \
    int faulted;                                                \
    ivc_guard_range(&guard, 0, (base), (size));                 \
    ivc_guard_range(&guard, 1, (base2), (size2));               \
    faulted = sigsetjmp(guard.env, 0);                          \
    if (faulted)                                                \
        return -faulted;                                        \
    ivc_guard_now = &guard;                                     \
    __atomic_signal_fence(__ATOMIC_SEQ_CST)

#define IVC_GUARD(base, size) IVC_GUARD2(base, size, NULL, 0)

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

int ivc_g_copy2(char *dst, const char *src, size_t n, const char *base, size_t size,
                const char *base2, size_t size2)
{
    IVC_GUARD2(base, size, base2, size2);
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
