// pkstrace's BPF program for the bcc backend (pkstrace/backends/bcc.py).
//
// Tracepoints only (tracepoint argument structs come from the format files, so
// any kernel headers bcc accepts will do), plus kprobes on write_pkrs and the
// global-update functions where the kernel has kprobes (WITH_KPROBES).
//
// Modes (both may be on in one program):
//   WANT_EVENTS  every event into the BPF ring buffer `events`; a failed reserve
//                counts into `lost` (per CPU).
//   WANT_COUNTS  per-CPU counts by (kind, msr) in `counts`; cross-CPU calls by
//                (target cpu, func) in `calls`; queue -> entry latency matched by
//                csd pointer in `inflight`, as log2 histograms in `latency`.
//
// Every probe returns 1: a BPF program attached to a tracepoint through perf
// that returns 0 makes the kernel skip that tracepoint's perf events for
// everyone (perf_trace_run_bpf_submit), so `perf record` (or pkstrace's perf
// backend) running at the same time would silently see nothing.
//
// The Python side defines: MSR_KEEP(m) and CPU_KEEP(c) (filters), RINGBUF_PAGES,
// and one KIND_* per schema kind; the event layout below is mirrored by a numpy
// dtype there (keep them in step).

#include <uapi/linux/ptrace.h>

struct event_t {
    u64 ts;
    u64 value;
    u64 csd;
    u64 callsite;
    u64 func;
    u64 prot;
    u64 cpumask;        // ipi_send_cpumask: the first 64 CPUs
    s64 prev_state;
    u32 cpu;
    u32 pid;
    s32 target_cpu;
    s32 vector;
    u32 msr;
    s32 next_pid;
    u16 kind;
    s16 failed;
    s16 pkey;
    u16 pad;
    char comm[16];
    char next_comm[16];
};

struct count_key_t {
    u32 kind;
    u32 msr;            // 0xffffffff when not an MSR event
};

struct call_key_t {
    u64 func;
    u32 target_cpu;
    u32 pad;
};

struct inflight_t {
    u64 ts;
    u64 func;
    u32 target_cpu;
    u32 source_cpu;
};

struct hist_key_t {
    u64 func;
    u32 target_cpu;
    u32 slot;           // log2(latency ns)
};

#ifdef WANT_EVENTS
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);
#endif
#ifdef WANT_COUNTS
BPF_PERCPU_HASH(counts, struct count_key_t, u64, 1024);
BPF_PERCPU_HASH(calls, struct call_key_t, u64, 4096);
BPF_HASH(inflight, u64, struct inflight_t, 65536);
BPF_HASH(latency, struct hist_key_t, u64, 16384);
BPF_PERCPU_ARRAY(unmatched, u64, 1);   // entries whose csd had no queue seen
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

static __always_inline void count_event(u32 kind, u32 msr)
{
#ifdef WANT_COUNTS
    struct count_key_t key = {.kind = kind, .msr = msr};
    u64 zero = 0;
    u64 *n = counts.lookup_or_try_init(&key, &zero);
    if (n)
        (*n)++;
#endif
}

#ifdef WANT_EVENTS
static __always_inline struct event_t *new_event(u32 kind)
{
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        int zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->cpu = bpf_get_smp_processor_id();
    e->pid = (u32)bpf_get_current_pid_tgid();
    e->kind = kind;
    e->target_cpu = -1;
    e->vector = -1;
    e->next_pid = -1;
    e->failed = -1;
    e->pkey = -1;
    e->prev_state = -1;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}
#endif

static __always_inline int msr_event(u32 kind, u32 msr, u64 val, int failed)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()) || !MSR_KEEP(msr))
        return 1;
    count_event(kind, msr);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(kind);
    if (!e)
        return 1;
    e->msr = msr;
    e->value = val;
    e->failed = failed;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

TRACEPOINT_PROBE(msr, write_msr)
{
    return msr_event(KIND_MSR_WRITE, args->msr, args->val, args->failed);
}

#ifdef WITH_READ_MSR
TRACEPOINT_PROBE(msr, read_msr)
{
    return msr_event(KIND_MSR_READ, args->msr, args->val, args->failed);
}
#endif

TRACEPOINT_PROBE(csd, csd_queue_cpu)
{
    u32 cpu = bpf_get_smp_processor_id();
    if (!recording_on() || !CPU_KEEP(cpu))
        return 1;
    count_event(KIND_CSD_QUEUE, 0xffffffff);
#ifdef WANT_COUNTS
    struct call_key_t ck = {.func = (u64)args->func, .target_cpu = args->cpu};
    u64 zero = 0;
    u64 *n = calls.lookup_or_try_init(&ck, &zero);
    if (n)
        (*n)++;
    u64 csd = (u64)args->csd;
    if (csd) {
        struct inflight_t f = {.ts = bpf_ktime_get_ns(), .func = (u64)args->func,
                               .target_cpu = args->cpu, .source_cpu = cpu};
        inflight.update(&csd, &f);
    }
#endif
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_QUEUE);
    if (!e)
        return 1;
    e->target_cpu = args->cpu;
    e->callsite = (u64)args->callsite;
    e->func = (u64)args->func;
    e->csd = (u64)args->csd;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

TRACEPOINT_PROBE(csd, csd_function_entry)
{
    u32 cpu = bpf_get_smp_processor_id();
    if (!recording_on() || !CPU_KEEP(cpu))
        return 1;
    count_event(KIND_CSD_ENTRY, 0xffffffff);
#ifdef WANT_COUNTS
    u64 csd = (u64)args->csd;
    if (csd) {
        struct inflight_t *f = inflight.lookup(&csd);
        if (f) {
            u64 delta = bpf_ktime_get_ns() - f->ts;
            struct hist_key_t hk = {.func = f->func, .target_cpu = cpu,
                                    .slot = bpf_log2l(delta)};
            latency.atomic_increment(hk);
            inflight.delete(&csd);
        } else {
            int idx = 0;
            u64 *n = unmatched.lookup(&idx);
            if (n)
                (*n)++;
        }
    }
#endif
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_ENTRY);
    if (!e)
        return 1;
    e->func = (u64)args->func;
    e->csd = (u64)args->csd;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

TRACEPOINT_PROBE(csd, csd_function_exit)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_CSD_EXIT, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_CSD_EXIT);
    if (!e)
        return 1;
    e->func = (u64)args->func;
    e->csd = (u64)args->csd;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

#ifdef WITH_IPI
TRACEPOINT_PROBE(ipi, ipi_send_cpu)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_IPI_SEND, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_IPI_SEND);
    if (!e)
        return 1;
    e->target_cpu = args->cpu;
    e->callsite = (u64)args->callsite;
    e->func = (u64)args->callback;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

TRACEPOINT_PROBE(ipi, ipi_send_cpumask)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_IPI_SEND, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_IPI_SEND);
    if (!e)
        return 1;
    unsigned short off = args->data_loc_cpumask & 0xFFFF;
    bpf_probe_read_kernel(&e->cpumask, sizeof(e->cpumask), (void *)args + off);
    e->callsite = (u64)args->callsite;
    e->func = (u64)args->callback;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}
#endif

static __always_inline int callfunc_event(u32 kind, int vector)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(kind, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(kind);
    if (!e)
        return 1;
    e->vector = vector;
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

#ifdef WITH_CALLFUNC
TRACEPOINT_PROBE(irq_vectors, call_function_entry)
{
    return callfunc_event(KIND_CALLFUNC_ENTRY, args->vector);
}

TRACEPOINT_PROBE(irq_vectors, call_function_exit)
{
    return callfunc_event(KIND_CALLFUNC_EXIT, args->vector);
}

TRACEPOINT_PROBE(irq_vectors, call_function_single_entry)
{
    return callfunc_event(KIND_CALLFUNC_ENTRY, args->vector);
}

TRACEPOINT_PROBE(irq_vectors, call_function_single_exit)
{
    return callfunc_event(KIND_CALLFUNC_EXIT, args->vector);
}
#endif

#ifdef WITH_SCHED
TRACEPOINT_PROBE(sched, sched_switch)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_SCHED_SWITCH, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_SCHED_SWITCH);
    if (!e)
        return 1;
    e->pid = args->prev_pid;
    bpf_probe_read_kernel(&e->comm, sizeof(e->comm), args->prev_comm);
    e->prev_state = args->prev_state;
    e->next_pid = args->next_pid;
    bpf_probe_read_kernel(&e->next_comm, sizeof(e->next_comm), args->next_comm);
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}
#endif

#ifdef WITH_KPROBES
// write_pkrs(u32 new)
int kprobe_write_pkrs(struct pt_regs *ctx)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_WRITE_PKRS, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_WRITE_PKRS);
    if (!e)
        return 1;
    e->value = (u32)PT_REGS_PARM1(ctx);
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}

// update_global_pkrs(int pkey, unsigned long prot) and friends
int kprobe_global_update(struct pt_regs *ctx)
{
    if (!recording_on() || !CPU_KEEP(bpf_get_smp_processor_id()))
        return 1;
    count_event(KIND_GLOBAL_UPDATE, 0xffffffff);
#ifdef WANT_EVENTS
    struct event_t *e = new_event(KIND_GLOBAL_UPDATE);
    if (!e)
        return 1;
    e->pkey = (s16)(int)PT_REGS_PARM1(ctx);
    e->prot = PT_REGS_PARM2(ctx);
    events.ringbuf_submit(e, 0);
#endif
    return 1;
}
#endif
