// pkstrace's BPF program for the bcc backend (pkstrace/backends/bcc.py).
//
// Tracepoints only (tracepoint argument structs come from the format files, so
// any kernel headers bcc accepts will do), plus kprobes on write_pkrs and the
// global-update functions where the kernel has kprobes (WITH_KPROBES), or fentry
// programs on them (WITH_FENTRY, FENTRY_PROGS: see the end of this file).
//
// Modes (both may be on in one program):
//   WANT_EVENTS  every event into this CPU's BPF ring buffer (`rings`); a failed
//                reserve counts into `lost` (per CPU).
//                With PERF_BUFFER (kernels before 5.8, or --bpf-buffer perf) into
//                this CPU's perf ring (`events`, BPF_PERF_OUTPUT) instead: the
//                record is built in a per-CPU scratch slot (`perfbuf`) and copied
//                out by bpf_perf_event_output(); a failed output counts into `lost`,
//                an accepted one into perfbuf.sent, which the Python side compares
//                with what reached its reader (a kernel that accepts an output and
//                never writes it would otherwise lose it silently).
//   WANT_COUNTS  per-CPU counts in the array `counts`, indexed by
//                kind * NSLOTS + MSR slot (slot 0: not an MSR event; 1..: the
//                known MSRs, MSR_SLOT(m); OTHER_SLOT: any other MSR, also counted
//                by number in the per-CPU hash `other_msrs`); cross-CPU calls by
//                (target cpu, func) in `calls`; queue -> entry latency matched by
//                csd pointer in `inflight`, as log2 histograms in `latency`.
//
// Cost is what this file is about (issue 6: counts mode at most half of
// bpftrace's count() per event, events mode no more than it). Measured with
// `pkstrace bench overhead` (benchmarks/README.md); what made the difference:
//   - every probe does only its own work, filters are compile-time constants;
//   - counts: a per-CPU array slot whose index is a constant for all but the
//     MSR probes (the kernel inlines the lookup: no helper call, no hash, no lock),
//     and arrays, not hashes, for the calls, the in-flight table and latencies;
//   - events: a 56-byte record, 64 with its header (was 128 + 8) written field by field (no memset), no
//     bpf_get_current_comm() per event (only sched_switch carries names; the
//     Python side maps pid -> comm from them), and no wake-up per record
//     (BPF_RB_NO_WAKEUP: the reader polls on a timer; a wake-up is an irq_work
//     self-IPI, itself an x2APIC ICR write = another msr:write_msr event here).
//   - the perf-buffer path (PERF_BUFFER) costs about twice the ring's in the
//     kernel: 395-434 ns/event against 181-202 (bpf_stats, 3 runs each, load 4.5-7.7,
//     `pkstrace bench overhead --tracers untraced,bpftrace,bcc-events,bcc-events-perfbuf
//     --runs 3 --bpf-runs 3 --calls 20000`); bpf_perf_event_output() prepares a perf
//     sample and copies the record, where the ring reserves in place. Its perf
//     events wake the reader only past half a ring (watermark), for the same reason.
//
// Every probe returns 1: a BPF program attached to a tracepoint through perf
// that returns 0 makes the kernel skip that tracepoint's perf events for
// everyone (perf_trace_run_bpf_submit), so `perf record` (or pkstrace's perf
// backend) running at the same time would silently see nothing. (A raw
// tracepoint program's return value is ignored.)
//
// Two ways in, chosen per tracepoint by the Python side (--bpf-attach):
//   classic  TRACEPOINT_PROBE: runs through trace_call_bpf(), whose recursion
//            guard is ONE per-CPU counter (bpf_prog_active) for every kprobe and
//            tracepoint BPF program on the machine: an IPI handler's tracepoint
//            that fires while any of them runs on that CPU (csd_queue_cpu in
//            process context, say) is skipped, only its recursion_misses grows.
//   raw      (RAW_<EVENT> defined) a BPF_PROG_TYPE_RAW_TRACEPOINT program on the
//            tracepoint's TP_PROTO arguments (ctx->args[i]), run by
//            __bpf_trace_run(): its guard is per PROGRAM (prog->active, Linux
//            6.1+; none at all 4.17-6.0), so an interrupt's program runs inside
//            another of ours; only the same program nesting in itself is skipped.
//            Also cheaper: no perf_trace record is formatted first.
// With any raw program (NESTING defined) programs can interrupt each other on
// one CPU, so the counters every program shares are bumped atomically (BUMP),
// and the perf-buffer path gets one scratch record per nesting level.
//
// The Python side defines: MSR_KEEP(m) and CPU_KEEP(c) (filters), RINGBUF_PAGES
// (per ring), EVENT_RINGS, PERF_BUFFER (perf rings instead of BPF ring buffers),
// PERF_NEST, NSLOTS, OTHER_SLOT, MSR_SLOT(m), NKINDS, NCPUS, NFUNC, INFLIGHT_SLOTS,
// INFLIGHT_BITS, one KIND_* per schema kind, NESTING and RAW_<EVENT> (raw
// tracepoints), TASK_PID_OFF, TASK_COMM_OFF, TASK_EXIT_STATE_OFF (task_struct,
// from the kernel's BTF: the headers bcc compiles with need not match); the
// event layout below is mirrored by a numpy dtype there (keep them in step).

#include <uapi/linux/ptrace.h>

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

#ifndef BPF_RB_NO_WAKEUP
#define BPF_RB_NO_WAKEUP 1
#endif

// A counter more than one program may bump: atomic where programs can nest
// (raw tracepoints: an interrupt's program between our load and store would
// otherwise lose its increment), a plain add under the classic global guard.
// BUMP_OWN: a counter only one program bumps: plain, unless that program can
// nest in itself (raw tracepoints before Linux 6.1 had no per-program guard).
#ifdef NESTING
#define BUMP(p) __sync_fetch_and_add((p), 1)
#else
#define BUMP(p) ((*(p))++)
#endif
#ifdef SELF_NESTING
#define BUMP_OWN(p) __sync_fetch_and_add((p), 1)
#else
#define BUMP_OWN(p) ((*(p))++)
#endif

#ifndef PERF_NEST
#define PERF_NEST 1
#endif

// One record for every kind: a common head and a per-kind body.
//   msr_*        a = value, i = msr, failed
//   csd_queue    a = csd, b = callsite, c = func, i = target cpu
//   csd_entry/exit a = csd, c = func
//   ipi_send     b = callsite, c = callback, i = target cpu (cpu form) or
//                a = first 64 CPUs of the mask, i = -1 (cpumask form)
//   callfunc_*   i = vector
//   write_pkrs   a = new value
//   global_update b = prot, i = pkey
//   sched_switch the `sw` body; head pid = prev_pid
struct event_t {
    u64 ts;
    u32 pid;
    u16 cpu;
    u8 kind;
    s8 failed;
    union {
        struct {
            u64 a;
            u64 b;
            u64 c;
            s32 i;
            u32 pad;
            u64 pad2;
        } g;
        struct {
            s32 prev_state;     // the kernel's long; every state fits 32 bits
            s32 next_pid;
            char prev_comm[16];
            char next_comm[16];
        } sw;
    };
};

// 56 bytes: with the ring's 8-byte record header, one record = one cache line,
// and every record starts on a line (the data area is page aligned).
_Static_assert(sizeof(struct event_t) == 56, "event_t must stay 56 bytes");

struct other_msr_key_t {
    u32 kind;
    u32 msr;
};

// The functions this CPU has seen called cross-CPU, in order of first sight; a
// function's index here selects its rows in `calls` (row FUNCTAB_QUEUE, written
// by csd_queue_cpu only) or `latency` (row FUNCTAB_ENTRY, csd_function_entry
// only). Per CPU and per program, so nothing else writes a row while its program
// adds a function: no other CPU, and no program interrupting it (raw tracepoints
// nest; a program never nests in itself where the kernel has a guard (6.1+), and
// neither runs in NMI context).
#define FUNCTAB_QUEUE 0
#define FUNCTAB_ENTRY 1
struct functab_t {
    u64 func[NFUNC];
};

// One queued call awaiting its entry, in the target CPU's row of `inflight`,
// slot chosen by a hash of the csd pointer.
struct inflight_t {
    u64 csd;
    u64 ts;             // 0: consumed (its entry was seen) or never used
};

#ifdef WANT_EVENTS
#ifdef PERF_BUFFER
// bcc sizes it to the possible CPUs; the Python side opens one perf event per
// CPU (PERF_COUNT_SW_BPF_OUTPUT) and stores its fd at that CPU's index.
BPF_PERF_OUTPUT(events);
struct perfbuf_t {
    struct event_t e[PERF_NEST];  // the records being built, one per nesting
                        // level (perf output copies each out)
    u64 writing;        // records being built: raised before a record's ts is
                        // taken, lowered once it is out: the reader's watermark
                        // (no earlier record can follow while it is 0)
    u64 sent;           // outputs the kernel accepted on this CPU
};
// Per CPU, so no other CPU writes it. On one CPU a program may interrupt another
// (raw tracepoints): each takes the next level, and gives it back before the one
// it interrupted resumes, so a plain increment / decrement of `writing` is exact.
BPF_PERCPU_ARRAY(perfbuf, struct perfbuf_t, 1);
#else
// One ring per CPU (events0 .. events<NCPUS-1>, declared by EVENT_RINGS): with
// one shared ring every record took its spinlock and producer position, two
// cache lines that then moved between the CPUs at each event.
EVENT_RINGS
BPF_ARRAY_OF_MAPS(rings, "events0", NCPUS);
#endif
BPF_PERCPU_ARRAY(lost, u64, 1);
#endif
#ifdef WANT_COUNTS
BPF_PERCPU_ARRAY(counts, u64, NKINDS * NSLOTS);
BPF_PERCPU_HASH(other_msrs, struct other_msr_key_t, u64, 1024);
// No hash maps on the cross-CPU path: a hash update or lookup there cost 200-500 ns
// per event (bucket lock, element on a cold cache line written by the other CPU),
// the tables below a few ns plus the one shared line of `inflight`.
BPF_PERCPU_ARRAY(functab, struct functab_t, 2);  // [FUNCTAB_QUEUE], [FUNCTAB_ENTRY]
BPF_PERCPU_ARRAY(calls, u64, NFUNC * NCPUS);      // [func index][target cpu], per source CPU
BPF_PERCPU_ARRAY(latency, u64, NFUNC * 64);       // [func index][log2 ns], per target CPU
BPF_ARRAY(inflight, struct inflight_t, NCPUS * INFLIGHT_SLOTS);
// [0] entries whose queue was not seen (or was overwritten: slot collision),
// [1] calls and [2] latencies not broken down (more than NFUNC functions on a CPU)
BPF_PERCPU_ARRAY(unmatched, u64, 3);
#endif

// One switch for every probe: attaching and detaching programs one by one takes
// milliseconds each (text patching), so the Python side turns recording on only
// once all are attached and off before detaching any. Without it a queue could
// be recorded while its entry's program is not attached yet / any more.
BPF_ARRAY(control, u32, 1);

static __always_inline int recording_on(void)
{
    int zero = 0;
    u32 *on = control.lookup(&zero);
    return on && *on;
}

#define KEEP_CPU() (recording_on() && CPU_KEEP(bpf_get_smp_processor_id()))

// Counts slots are per kind, and most kinds have one program (BUMP_OWN); the
// kinds two programs share (ipi_send, callfunc_*) take the atomic add.
static __always_inline void count_at(u32 idx, int shared)
{
#ifdef WANT_COUNTS
    u64 *n = counts.lookup(&idx);
    if (n) {
        if (shared)
            BUMP(n);
        else
            BUMP_OWN(n);
    }
#endif
}

// A kind without an MSR: slot 0, the index is a compile-time constant.
#define COUNT(kind) count_at((kind) * NSLOTS, 0)
#define COUNT_SHARED(kind) count_at((kind) * NSLOTS, 1)

#ifdef WANT_COUNTS
static __always_inline void bump_unmatched(u32 idx)
{
    u64 *n = unmatched.lookup(&idx);   // [1] csd_queue's, [0] and [2] csd_entry's
    if (n)
        BUMP_OWN(n);
}

// Index of func in this CPU's table `row`, adding it if new; -1 when it is full.
static __always_inline int func_index(u32 row, u64 func)
{
    struct functab_t *t = functab.lookup(&row);
    if (!t)
        return -1;
#pragma unroll
    for (int i = 0; i < NFUNC; i++) {
        u64 f = t->func[i];
        if (f == func)
            return i;
        if (f == 0) {
            t->func[i] = func;
            return i;
        }
    }
    return -1;
}

static __always_inline u32 inflight_slot(u32 cpu, u64 csd)
{
    // Fibonacci hash of the pointer: stack addresses differ in middle bits.
    return cpu * INFLIGHT_SLOTS + (u32)((csd * 0x9E3779B97F4A7C15ULL) >> (64 - INFLIGHT_BITS));
}
#endif

#ifdef WANT_EVENTS
static __always_inline void count_lost(void)
{
    int zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        BUMP(n);
}

#ifdef PERF_BUFFER
static __always_inline struct event_t *reserve_event(void)
{
    int zero = 0;
    struct perfbuf_t *p = perfbuf.lookup(&zero);
    if (!p)
        return 0;
    u64 level = READ_ONCE(p->writing);
    if (level >= PERF_NEST) {   // deeper than the levels we keep (raw tracepoints)
        count_lost();
        return 0;
    }
    WRITE_ONCE(p->writing, level + 1);  // before the ts is taken (see perfbuf_t)
    return &p->e[level];
}

// The record goes out (copied into this CPU's perf ring); `e` is perfbuf's.
static __always_inline void submit_event(void *ctx, struct event_t *e)
{
    int zero = 0;
    struct perfbuf_t *p = perfbuf.lookup(&zero);
    if (!p)
        return;
    if (events.perf_submit(ctx, e, sizeof(*e)) == 0)
        BUMP(&p->sent);
    else
        count_lost();
    WRITE_ONCE(p->writing, READ_ONCE(p->writing) - 1);
}
#else
static __always_inline struct event_t *reserve_event(void)
{
    u32 cpu = bpf_get_smp_processor_id();
    void *ring = rings.lookup(&cpu);
    struct event_t *e = ring ? bpf_ringbuf_reserve(ring, sizeof(struct event_t), 0) : 0;
    if (!e)
        count_lost();
    return e;
}

#define submit_event(ctx, e) bpf_ringbuf_submit((e), BPF_RB_NO_WAKEUP)
#endif

static __always_inline struct event_t *new_event(u32 kind)
{
    struct event_t *e = reserve_event();
    if (!e)
        return 0;
    e->ts = bpf_ktime_get_ns();
    e->pid = (u32)bpf_get_current_pid_tgid();
    e->cpu = bpf_get_smp_processor_id();
    e->kind = kind;
    e->failed = -1;
    return e;
}

static __always_inline void put_generic(void *ctx, struct event_t *e, u64 a, u64 b, u64 c,
                                        s32 i)
{
    e->g.a = a;
    e->g.b = b;
    e->g.c = c;
    e->g.i = i;
    e->g.pad = 0;
    submit_event(ctx, e);
}
#endif

static __always_inline int msr_event(void *ctx, u32 kind, u32 msr, u64 val, int failed)
{
    if (!KEEP_CPU() || !MSR_KEEP(msr))
        return 1;
#ifdef WANT_COUNTS
    u32 slot = MSR_SLOT(msr);
    count_at(kind * NSLOTS + slot, 0);   // msr_write: write_msr's, msr_read: read_msr's
    if (slot == OTHER_SLOT) {
        struct other_msr_key_t key = {.kind = kind, .msr = msr};
        u64 zero = 0;
        u64 *n = other_msrs.lookup_or_try_init(&key, &zero);   // keyed by kind
        if (n)
            BUMP_OWN(n);
    }
#endif
#ifdef WANT_EVENTS
    struct event_t *e = new_event(kind);
    if (!e)
        return 1;
    e->failed = failed;
    put_generic(ctx, e, val, 0, 0, msr);
#endif
    return 1;
}

// Each tracepoint: its body (on_*) and one entry point, classic or raw
// (RAW_<EVENT>). Raw arguments are the tracepoint's TP_PROTO, in order.

// msr:write_msr / read_msr  TP_PROTO(unsigned msr, u64 val, int failed)
#ifdef RAW_WRITE_MSR
#ifdef WRITE_MSR_TWIN
// The one nesting left with raw programs: an MSR write in an interrupt (a timer
// reprogram, an IPI sent from irq context) while rawtp_write_msr runs for a
// process-context write (an IPI's ICR write, interrupts on) on the same CPU: the
// kernel's per-program guard skips the inner run. A second program on the same
// tracepoint records exactly those: it acts only while the first is busy on this
// CPU (so only when the kernel skipped the first), and counts what it took over in
// `twin_took`; the Python side subtracts that from the first program's misses.
// Needs the per-program guard (Linux 6.1+): without it the first would nest and
// record the event too. Attached after the first, so it runs after it.
BPF_PERCPU_ARRAY(msr_busy, u32, 1);
BPF_PERCPU_ARRAY(twin_took, u64, 1);
#endif
int rawtp_write_msr(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef WRITE_MSR_TWIN
    int zero = 0;
    u32 *busy = msr_busy.lookup(&zero);
    if (busy)
        WRITE_ONCE(*busy, 1);
#endif
    msr_event(ctx, KIND_MSR_WRITE, (u32)ctx->args[0], ctx->args[1], (int)ctx->args[2]);
#ifdef WRITE_MSR_TWIN
    if (busy)
        WRITE_ONCE(*busy, 0);
#endif
    return 0;
}

#ifdef WRITE_MSR_TWIN
int twin_write_msr(struct bpf_raw_tracepoint_args *ctx)
{
    int zero = 0;
    u32 *busy = msr_busy.lookup(&zero);
    if (!busy || !READ_ONCE(*busy))
        return 0;   // the first program ran (or runs) for this event
    u64 *n = twin_took.lookup(&zero);
    if (n)
        BUMP(n);
    msr_event(ctx, KIND_MSR_WRITE, (u32)ctx->args[0], ctx->args[1], (int)ctx->args[2]);
    return 0;
}
#endif
#else
TRACEPOINT_PROBE(msr, write_msr)
{
    return msr_event(args, KIND_MSR_WRITE, args->msr, args->val, args->failed);
}
#endif

#ifdef WITH_READ_MSR
#ifdef RAW_READ_MSR
int rawtp_read_msr(struct bpf_raw_tracepoint_args *ctx)
{
    msr_event(ctx, KIND_MSR_READ, (u32)ctx->args[0], ctx->args[1], (int)ctx->args[2]);
    return 0;
}
#else
TRACEPOINT_PROBE(msr, read_msr)
{
    return msr_event(args, KIND_MSR_READ, args->msr, args->val, args->failed);
}
#endif
#endif

static __always_inline int on_csd_queue(void *ctx, u32 target, u64 callsite, u64 func, u64 csd)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_CSD_QUEUE);
#ifdef WANT_COUNTS
    if (target < NCPUS) {
        int fi = func_index(FUNCTAB_QUEUE, func);
        if (fi >= 0) {
            u32 idx = fi * NCPUS + target;
            u64 *n = calls.lookup(&idx);   // csd_queue_cpu's only
            if (n)
                BUMP_OWN(n);
        } else {
            bump_unmatched(1);
        }
        if (csd) {
            u32 idx = inflight_slot(target, csd);
            struct inflight_t *f = inflight.lookup(&idx);
            if (f) {
                // csd before ts; the entry reads ts before csd (x86 keeps stores
                // and loads in order), so a matching csd never pairs with a
                // timestamp another csd in the same slot left.
                WRITE_ONCE(f->csd, csd);
                WRITE_ONCE(f->ts, bpf_ktime_get_ns());
            }
        }
    }
#endif
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_QUEUE);
    if (!e)
        return 1;
    put_generic(ctx, e, csd, callsite, func, target);
#endif
    return 1;
}

// csd:csd_queue_cpu  TP_PROTO(const unsigned int cpu, unsigned long callsite,
//                             smp_call_func_t func, call_single_data_t *csd)
#ifdef RAW_CSD_QUEUE_CPU
int rawtp_csd_queue_cpu(struct bpf_raw_tracepoint_args *ctx)
{
    on_csd_queue(ctx, (u32)ctx->args[0], ctx->args[1], ctx->args[2], ctx->args[3]);
    return 0;
}
#else
TRACEPOINT_PROBE(csd, csd_queue_cpu)
{
    return on_csd_queue(args, args->cpu, (u64)args->callsite, (u64)args->func, (u64)args->csd);
}
#endif

static __always_inline int on_csd_entry(void *ctx, u64 func, u64 csd)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_CSD_ENTRY);
#ifdef WANT_COUNTS
    u32 cpu = bpf_get_smp_processor_id();
    if (csd && cpu < NCPUS) {
        u32 idx = inflight_slot(cpu, csd);
        struct inflight_t *f = inflight.lookup(&idx);
        u64 queued = f ? READ_ONCE(f->ts) : 0;
        if (queued && READ_ONCE(f->csd) == csd) {
            WRITE_ONCE(f->ts, 0);
            u64 delta = bpf_ktime_get_ns() - queued;
            int fi = func_index(FUNCTAB_ENTRY, func);
            if (fi >= 0) {
                // bcc's bpf_log2l() is fls(): floor(log2) + 1 (1 for 0 and 1), so
                // slot k = [2^k, 2^(k+1)) ns is bpf_log2l() - 1.
                u32 h = fi * 64 + ((bpf_log2l(delta) - 1) & 63);
                u64 *n = latency.lookup(&h);   // csd_function_entry's only
                if (n)
                    BUMP_OWN(n);
            } else {
                bump_unmatched(2);
            }
        } else {
            bump_unmatched(0);
        }
    }
#endif
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_ENTRY);
    if (!e)
        return 1;
    put_generic(ctx, e, csd, 0, func, -1);
#endif
    return 1;
}

static __always_inline int on_csd_exit(void *ctx, u64 func, u64 csd)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_CSD_EXIT);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_EXIT);
    if (!e)
        return 1;
    put_generic(ctx, e, csd, 0, func, -1);
#endif
    return 1;
}

// csd:csd_function_entry / exit  TP_PROTO(smp_call_func_t func, call_single_data_t *csd)
#ifdef RAW_CSD_FUNCTION_ENTRY
int rawtp_csd_function_entry(struct bpf_raw_tracepoint_args *ctx)
{
    on_csd_entry(ctx, ctx->args[0], ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(csd, csd_function_entry)
{
    return on_csd_entry(args, (u64)args->func, (u64)args->csd);
}
#endif

#ifdef RAW_CSD_FUNCTION_EXIT
int rawtp_csd_function_exit(struct bpf_raw_tracepoint_args *ctx)
{
    on_csd_exit(ctx, ctx->args[0], ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(csd, csd_function_exit)
{
    return on_csd_exit(args, (u64)args->func, (u64)args->csd);
}
#endif

#ifdef WITH_IPI
// mask: the first 64 CPUs of the cpumask (cpumask form), target -1; or the cpu
static __always_inline int on_ipi_send(void *ctx, s32 target, u64 mask, u64 callsite,
                                       u64 callback)
{
    if (!KEEP_CPU())
        return 1;
    COUNT_SHARED(KIND_IPI_SEND);   // ipi_send_cpu's and ipi_send_cpumask's
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_IPI_SEND);
    if (!e)
        return 1;
    put_generic(ctx, e, mask, callsite, callback, target);
#endif
    return 1;
}

// ipi:ipi_send_cpu  TP_PROTO(const unsigned int cpu, unsigned long callsite, void *callback)
#ifdef RAW_IPI_SEND_CPU
int rawtp_ipi_send_cpu(struct bpf_raw_tracepoint_args *ctx)
{
    on_ipi_send(ctx, (s32)ctx->args[0], 0, ctx->args[1], ctx->args[2]);
    return 0;
}
#else
TRACEPOINT_PROBE(ipi, ipi_send_cpu)
{
    return on_ipi_send(args, args->cpu, 0, (u64)args->callsite, (u64)args->callback);
}
#endif

// ipi:ipi_send_cpumask  TP_PROTO(const struct cpumask *cpumask, unsigned long callsite,
//                                void *callback)
#ifdef RAW_IPI_SEND_CPUMASK
int rawtp_ipi_send_cpumask(struct bpf_raw_tracepoint_args *ctx)
{
    u64 mask = 0;
#ifdef WANT_EVENTS
    // Only when recording: the read is the one helper call here.
    if (KEEP_CPU())
        bpf_probe_read_kernel(&mask, sizeof(mask), (void *)ctx->args[0]);
#endif
    on_ipi_send(ctx, -1, mask, ctx->args[1], ctx->args[2]);
    return 0;
}
#else
TRACEPOINT_PROBE(ipi, ipi_send_cpumask)
{
    u64 mask = 0;
#ifdef WANT_EVENTS
    unsigned short off = args->data_loc_cpumask & 0xFFFF;
    bpf_probe_read_kernel(&mask, sizeof(mask), (void *)args + off);
#endif
    return on_ipi_send(args, -1, mask, (u64)args->callsite, (u64)args->callback);
}
#endif
#endif

static __always_inline int callfunc_event(void *ctx, u32 kind, int vector)
{
    if (!KEEP_CPU())
        return 1;
    COUNT_SHARED(kind);   // call_function_* and call_function_single_*
#ifdef WANT_EVENTS
    struct event_t *e = new_event(kind);
    if (!e)
        return 1;
    put_generic(ctx, e, 0, 0, 0, vector);
#endif
    return 1;
}

#ifdef WITH_CALLFUNC
// irq_vectors:call_function(_single)_entry / exit  TP_PROTO(int vector)
#define CALLFUNC_PROBE(event, kind) \
    int rawtp_##event(struct bpf_raw_tracepoint_args *ctx) \
    { callfunc_event(ctx, kind, (int)ctx->args[0]); return 0; }
#ifdef RAW_CALL_FUNCTION_ENTRY
CALLFUNC_PROBE(call_function_entry, KIND_CALLFUNC_ENTRY)
#else
TRACEPOINT_PROBE(irq_vectors, call_function_entry)
{
    return callfunc_event(args, KIND_CALLFUNC_ENTRY, args->vector);
}
#endif

#ifdef RAW_CALL_FUNCTION_EXIT
CALLFUNC_PROBE(call_function_exit, KIND_CALLFUNC_EXIT)
#else
TRACEPOINT_PROBE(irq_vectors, call_function_exit)
{
    return callfunc_event(args, KIND_CALLFUNC_EXIT, args->vector);
}
#endif

#ifdef RAW_CALL_FUNCTION_SINGLE_ENTRY
CALLFUNC_PROBE(call_function_single_entry, KIND_CALLFUNC_ENTRY)
#else
TRACEPOINT_PROBE(irq_vectors, call_function_single_entry)
{
    return callfunc_event(args, KIND_CALLFUNC_ENTRY, args->vector);
}
#endif

#ifdef RAW_CALL_FUNCTION_SINGLE_EXIT
CALLFUNC_PROBE(call_function_single_exit, KIND_CALLFUNC_EXIT)
#else
TRACEPOINT_PROBE(irq_vectors, call_function_single_exit)
{
    return callfunc_event(args, KIND_CALLFUNC_EXIT, args->vector);
}
#endif
#endif

#ifdef WITH_SCHED
#ifdef RAW_SCHED_SWITCH
// sched:sched_switch  TP_PROTO(bool preempt, struct task_struct *prev,
//                              struct task_struct *next, unsigned int prev_state)
// (the four-argument form: Linux 5.18+; the Python side checks it in BTF).
// The classic event's prev_state is __trace_sched_switch_state(): built here the
// same way from the raw state (task state bits as of 5.18+).
#define TASK_REPORT 0x7f
#define TASK_REPORT_IDLE 0x80
#define TASK_REPORT_MAX 0x100
#define TASK_IDLE_BITS (0x2 | 0x400)           // TASK_UNINTERRUPTIBLE | TASK_NOLOAD
#define TASK_AS_UNINTERRUPTIBLE (0x1000 | 0x8000)  // TASK_RTLOCK_WAIT | TASK_FROZEN
int rawtp_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    if (!KEEP_CPU())
        return 0;
    COUNT(KIND_SCHED_SWITCH);
#ifdef WANT_EVENTS
    struct event_t *e = reserve_event();
    if (!e)
        return 0;
    e->ts = bpf_ktime_get_ns();
    // The tracepoint fires in __schedule() before the switch: prev is still
    // `current`, so its pid and name come from the helpers (cheaper than reads).
    void *prev = (void *)ctx->args[1];
    void *next = (void *)ctx->args[2];
    u32 raw_state = (u32)ctx->args[3];
    u32 exit_state = 0;
    s32 next_pid = 0;
    bpf_probe_read_kernel(&next_pid, sizeof(next_pid), next + TASK_PID_OFF);
    e->pid = (u32)bpf_get_current_pid_tgid();
    e->cpu = bpf_get_smp_processor_id();
    e->kind = KIND_SCHED_SWITCH;
    e->failed = -1;
    s32 state = TASK_REPORT_MAX;   // preempted: always running
    if (!(ctx->args[0] & 0xff)) {
        // exit_state is set only on the way out (exit_notify), before the task's
        // last switch in TASK_DEAD (0x80): read it only then.
        if (raw_state & 0x80)
            bpf_probe_read_kernel(&exit_state, sizeof(exit_state),
                                  prev + TASK_EXIT_STATE_OFF);
        u32 bits = (raw_state | exit_state) & TASK_REPORT;
        if ((raw_state & TASK_IDLE_BITS) == TASK_IDLE_BITS)
            bits = TASK_REPORT_IDLE;
        if (raw_state & TASK_AS_UNINTERRUPTIBLE)
            bits = 0x2;
        // 1 << (fls(bits) - 1): the highest bit set (bpf_log2l() is fls); 0 stays 0
        state = bits ? 1 << ((bpf_log2l(bits) - 1) & 31) : 0;
    }
    e->sw.prev_state = state;
    e->sw.next_pid = next_pid;
    bpf_get_current_comm(e->sw.prev_comm, sizeof(e->sw.prev_comm));
    bpf_probe_read_kernel(e->sw.next_comm, sizeof(e->sw.next_comm), next + TASK_COMM_OFF);
    submit_event(ctx, e);
#endif
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_SCHED_SWITCH);
#ifdef WANT_EVENTS
    struct event_t *e = reserve_event();
    if (!e)
        return 1;
    e->ts = bpf_ktime_get_ns();
    e->pid = args->prev_pid;
    e->cpu = bpf_get_smp_processor_id();
    e->kind = KIND_SCHED_SWITCH;
    e->failed = -1;
    e->sw.prev_state = args->prev_state;
    e->sw.next_pid = args->next_pid;
    // The names are in the tracepoint record itself: plain loads, no helper.
    __builtin_memcpy(e->sw.prev_comm, args->prev_comm, sizeof(e->sw.prev_comm));
    __builtin_memcpy(e->sw.next_comm, args->next_comm, sizeof(e->sw.next_comm));
    submit_event(args, e);
#endif
    return 1;
}
#endif
#endif

#if defined(WITH_KPROBES) || defined(WITH_FENTRY)
// write_pkrs(u32 new): one body for the kprobe and the fentry program.
static __always_inline int on_write_pkrs(void *ctx, u32 new)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_WRITE_PKRS);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_WRITE_PKRS);
    if (!e)
        return 1;
    put_generic(ctx, e, new, 0, 0, -1);
#endif
    return 1;
}

// update_global_pkrs(int pkey, unsigned long prot) and friends
static __always_inline int on_global_update(void *ctx, s32 pkey, u64 prot)
{
    if (!KEEP_CPU())
        return 1;
    COUNT(KIND_GLOBAL_UPDATE);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_GLOBAL_UPDATE);
    if (!e)
        return 1;
    put_generic(ctx, e, 0, prot, 0, pkey);
#endif
    return 1;
}
#endif

#ifdef WITH_KPROBES
int kprobe_write_pkrs(struct pt_regs *ctx)
{
    return on_write_pkrs(ctx, (u32)PT_REGS_PARM1(ctx));
}

int kprobe_global_update(struct pt_regs *ctx)
{
    return on_global_update(ctx, (s32)PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
}
#endif

#ifdef WITH_FENTRY
// fentry (BPF trampoline) twins of the kprobes, for kernels with BTF where kprobes
// are off. FENTRY_PROGS (from the Python side) instantiates one program per probed
// function: FENTRY_WPKRS(0) FENTRY_GLOBAL(0) FENTRY_GLOBAL(1) ...; bcc.py loads
// each against its function's BTF id itself (bcc 0.26's KFUNC_PROBE finds targets
// in vmlinux BTF only, and write_pkrs may live in a module). BPF_PROG (bcc's
// helpers) types the arguments from the trampoline's u64 array. Unlike the other
// probes they return 0: the verifier allows nothing else from an fentry program.
#define FENTRY_WPKRS(n) \
    BPF_PROG(fentry_wpkrs_##n, u32 new) { on_write_pkrs(ctx, new); return 0; }
#define FENTRY_GLOBAL(n) \
    BPF_PROG(fentry_global_##n, int pkey, unsigned long prot) \
    { on_global_update(ctx, pkey, prot); return 0; }
FENTRY_PROGS
#endif
