// SPDX-License-Identifier: GPL-2.0
/*
 * pks_test: the code paths of the PKS (Protection Keys for Supervisor) review,
 * written from scratch for pkstrace's emulated host. It is loaded into a QEMU
 * guest (TCG, -cpu max, which has PKS) and driven through debugfs:
 *
 *   insmod pks_test.ko scenario=v3 iterations=10 threads=3
 *   echo run > /sys/kernel/debug/pks_test/control    # blocks until done
 *   cat /sys/kernel/debug/pks_test/counters           # JSON ground truth
 *
 * A per-CPU PKRS cache and write_pkrs() (get_cpu_ptr()/put_cpu_ptr(), as in
 * the reviewed series), plus update_global_pkrs() in one of several designs:
 *
 *   v3           walk the online CPUs: per_cpu_ptr() + put_cpu_ptr() on each
 *                remote cache (one preempt_enable() too many per CPU) and
 *                wrmsrl_on_cpu() on each in turn.  To keep the guest alive
 *                the walk starts with preempt_count_add(nr_online) of
 *                "headroom" that the imbalance then eats: the depth still
 *                falls by one per CPU walked, but never goes negative.
 *   v3-race      the same, with the writers running during the walk, so the
 *                unsynchronised remote cache stores race with local writes:
 *                the IPI after a store into a writer's CPU is held back until
 *                that writer has hit the stale cache, at most race_delay_us.
 *   v3-raw       the v3 walk with no headroom: the preempt count goes
 *                negative. On 6.12 under TCG that is "BUG: scheduling while
 *                atomic" at the updater's next sleep, once per update; a walk
 *                that allocated would panic. Either is the result.
 *   broadcast    one on_each_cpu_mask(); each CPU updates its own cache.
 *   lazy         no IPIs: a generation number; each CPU applies the new
 *                value at its next write_pkrs().
 *   housekeeping on_each_cpu_mask() to housekeeping CPUs only; isolated CPUs
 *                apply lazily, as in "lazy".
 *
 * Function signatures are part of the contract with pkstrace's recorder,
 * which puts kprobes on them:
 *   p:GROUP/write_pkrs write_pkrs new=%di:x32
 *   p:GROUP/update_global_pkrs update_global_pkrs pkey=%di:s32 prot=%si:x64
 *
 * Lost updates are counted with definitions a trace can check event by event
 * (msr:write_msr for MSR 0x6e1 plus the write_pkrs kprobe):
 *   stale_hits   write_pkrs(v) finds v in its cache (no MSR write) while the
 *                MSR holds another value: the MSR value at entry, i.e. the
 *                last 0x6e1 write on that CPU before the write_pkrs event.
 *   lost_remote  a remote PKRS write u (an IPI handler: the kernel's
 *                __wrmsr_on_cpu, seen through a kprobe the module registers,
 *                or the broadcast handler) landed inside a write_pkrs(v) call,
 *                after its entry and before its own MSR write, and that call
 *                then wrote v != u: the update was overwritten.
 */
#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/cpumask.h>
#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/kprobes.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/sched/isolation.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/uaccess.h>
#include <asm/msr.h>
#include <asm/processor.h>
#include <asm/tlbflush.h>

#define MSR_IA32_PKRS_NR	0x6e1
#define CR4_PKS_BIT		24
#define CPUID7_ECX_PKS		(1U << 31)
/* Writers toggle access-disable of pkey 15: a "thread" with another PKRS. */
#define WRITER_BITS		(1U << 30)
#define MAX_STALLS		4096

enum design { D_V3, D_V3_RACE, D_V3_RAW, D_BROADCAST, D_LAZY, D_HOUSEKEEPING };
static const char *const design_names[] = {
	"v3", "v3-race", "v3-raw", "broadcast", "lazy", "housekeeping",
};

static char *scenario = "v3";
module_param(scenario, charp, 0444);
MODULE_PARM_DESC(scenario, "v3, v3-race, v3-raw, broadcast, lazy, housekeeping");
static int iterations = 10;
module_param(iterations, int, 0444);
MODULE_PARM_DESC(iterations, "global updates to issue");
static int threads = 3;
module_param(threads, int, 0444);
MODULE_PARM_DESC(threads, "writer kthreads (isolated CPUs first, then the highest others)");
static int updater_cpu;
module_param(updater_cpu, int, 0444);
static int race_delay_us = 5000;
module_param(race_delay_us, int, 0444);
MODULE_PARM_DESC(race_delay_us, "v3-race: longest hold of the IPI after a store into a writer's cache");
MODULE_PARM_DESC(updater_cpu, "CPU the global updates are issued from");

static enum design design;

/* Not static: kprobes find them by name. */
void write_pkrs(u32 new);
void update_global_pkrs(int pkey, unsigned long prot);

/* The design's state: what the reviewed series has. */
static DEFINE_PER_CPU(u32, pkrs_cache);
static u32 global_pkrs;
static unsigned long global_gen;	/* lazy / housekeeping: bumped per update */

/* The module's own bookkeeping (ground truth), per CPU. */
struct pks_stats {
	u64 calls;		/* write_pkrs() calls */
	u64 cache_hits;		/* write_pkrs() found the value cached: no MSR write */
	u64 msr_writes;		/* MSR 0x6e1 writes done by this module's code on this CPU */
	u64 stale_hits;		/* lost update (a), see top */
	u64 lost_remote;	/* lost update (b), see top */
	u64 lazy_applies;	/* a pending global value picked up by write_pkrs() */
	u64 handler_runs;	/* broadcast handler ran here */
	unsigned long applied_gen;
	/* lost_remote bookkeeping: inside write_pkrs(), before its MSR write */
	int in_wp;
	bool nested;		/* a remote PKRS write landed in that window */
	u32 nested_val;
};
static DEFINE_PER_CPU(struct pks_stats, pks_stats);
/* Remote calls aimed at each CPU, counted by the caller. */
static DEFINE_PER_CPU(atomic_long_t, remote_calls_to);

static atomic_long_t updates, broadcasts, remote_calls, local_calls, isolated_hits;
static long drift_min = LONG_MAX, drift_max = LONG_MIN, walked_cpus;
static u64 *stall_ns;
static int nr_stalls;

static struct cpumask isolated_mask, writer_mask;
static bool cpu_has_pks, cr4_pks_set;

/* Run control. */
static struct task_struct *updater_task;
static struct task_struct **writer_tasks;
static int nr_writers;
static atomic_t round_gen, writers_done, race_stop, race_window;
static DECLARE_COMPLETION(run_done);
static atomic_t run_state;	/* 0 idle, 1 running, 2 done */
static struct dentry *dbg_dir;

static bool design_is_lazy(void)
{
	return design == D_LAZY || design == D_HOUSEKEEPING;
}

/* A remote PKRS write is landing on this CPU (irqs off, IPI handler). */
static void note_remote_write(u32 val)
{
	struct pks_stats *st = this_cpu_ptr(&pks_stats);

	if (st->in_wp) {
		st->nested = true;
		st->nested_val = val;
	}
}

/* Write the MSR with irqs off, so the "landed inside" window closes atomically. */
static void pks_msr_write_local(struct pks_stats *st, u32 val)
{
	unsigned long flags;

	local_irq_save(flags);
	wrmsrl(MSR_IA32_PKRS_NR, val);
	st->msr_writes++;
	if (st->nested && st->nested_val != val)
		st->lost_remote++;
	st->in_wp = 0;
	local_irq_restore(flags);
}

noinline void write_pkrs(u32 new)
{
	struct pks_stats *st;
	u32 *pkrs;
	u64 entry_msr;

	pkrs = get_cpu_ptr(&pkrs_cache);
	/* Bookkeeping only: what the MSR held when the call began. */
	rdmsrl(MSR_IA32_PKRS_NR, entry_msr);
	st = this_cpu_ptr(&pks_stats);
	st->nested = false;
	st->in_wp = 1;
	st->calls++;
	if (design_is_lazy()) {
		unsigned long gen = READ_ONCE(global_gen);

		if (st->applied_gen != gen) {
			/* apply the pending global value: invalidate the cache */
			st->applied_gen = gen;
			*pkrs = ~new;
			st->lazy_applies++;
		}
	}
	if (*pkrs != new) {
		*pkrs = new;
		pks_msr_write_local(st, new);
	} else {
		st->in_wp = 0;
		st->cache_hits++;
		if ((u32)entry_msr != new)
			st->stale_hits++;
	}
	put_cpu_ptr(pkrs);
}
EXPORT_SYMBOL_GPL(write_pkrs);

/* broadcast / housekeeping: every target updates its own cache and MSR. */
static void pks_apply_handler(void *info)
{
	u32 val = (u32)(unsigned long)info;
	struct pks_stats *st = this_cpu_ptr(&pks_stats);

	note_remote_write(val);
	this_cpu_write(pkrs_cache, val);
	wrmsrl(MSR_IA32_PKRS_NR, val);
	st->msr_writes++;
	st->handler_runs++;
	st->applied_gen = READ_ONCE(global_gen);
}

/* wrmsrl_on_cpu()'s handler is the kernel's: watch it with a kprobe. */
static int wrmsr_on_cpu_pre(struct kprobe *p, struct pt_regs *regs)
{
	struct msr_info *rv = (struct msr_info *)regs->di;

	if (rv && rv->msr_no == MSR_IA32_PKRS_NR)
		note_remote_write((u32)rv->reg.q);
	return 0;
}

static struct kprobe wrmsr_kp = {
	.symbol_name = "__wrmsr_on_cpu",
	.pre_handler = wrmsr_on_cpu_pre,
};
static bool wrmsr_kp_on;

static void count_call(int cpu, int self)
{
	if (cpu == self) {
		atomic_long_inc(&local_calls);
		return;
	}
	atomic_long_inc(&remote_calls);
	atomic_long_inc(per_cpu_ptr(&remote_calls_to, cpu));
	if (cpumask_test_cpu(cpu, &isolated_mask))
		atomic_long_inc(&isolated_hits);
}

/*
 * v3-race widens the window between the remote cache store and the IPI that
 * writes the MSR (a real IPI takes 3-100 us to land) until the writer on that
 * CPU has found the new value in its cache while its MSR still holds the old
 * one (a stale hit), or race_delay_us passed. A fixed 300 us delay caught the
 * writers in 0-3 of 30 windows per run under TCG: on a busy host a writer
 * vCPU's 200 us nap took milliseconds, and the window closed before it woke.
 */
static void v3_race_window(int cpu)
{
	struct pks_stats *st = per_cpu_ptr(&pks_stats, cpu);
	u64 stale_before = READ_ONCE(st->stale_hits);
	int waited_us;

	if (!cpumask_test_cpu(cpu, &writer_mask))
		return;		/* nobody there to race with */
	for (waited_us = 0; waited_us < race_delay_us; waited_us += 10) {
		if (READ_ONCE(st->stale_hits) != stale_before)
			return;
		udelay(10);
	}
}

/* preempt_count() as a signed number: x86 keeps PREEMPT_NEED_RESCHED in bit 31 */
static long preempt_count_signed(void)
{
	return ((s32)((u32)preempt_count() << 1)) >> 1;
}

static void v3_walk(u32 new, bool headroom)
{
	int cpu, self = raw_smp_processor_id(), n = num_online_cpus();
	long before, after;

	if (headroom)
		preempt_count_add(n);	/* eaten by the walk's imbalance, see top */
	before = preempt_count_signed();
	for_each_online_cpu(cpu) {
		u32 *p = per_cpu_ptr(&pkrs_cache, cpu);

		*p = new;	/* unsynchronised store into another CPU's cache */
		put_cpu_ptr(p);	/* the reviewed imbalance: no matching get */
		if (design == D_V3_RACE && cpu != self)
			v3_race_window(cpu);
		count_call(cpu, self);
		wrmsrl_on_cpu(cpu, MSR_IA32_PKRS_NR, new);
	}
	after = preempt_count_signed();
	walked_cpus += n;
	drift_min = min(drift_min, after - before);
	drift_max = max(drift_max, after - before);
}

static void broadcast_to(const struct cpumask *mask, u32 new)
{
	int cpu, self = get_cpu();

	for_each_cpu_and(cpu, mask, cpu_online_mask)
		count_call(cpu, self);
	atomic_long_inc(&broadcasts);
	on_each_cpu_mask(mask, pks_apply_handler, (void *)(unsigned long)new, true);
	put_cpu();
}

noinline void update_global_pkrs(int pkey, unsigned long prot)
{
	u32 shift = 2 * pkey, new;
	u64 t0 = ktime_get_ns();
	struct cpumask *hk;

	new = (READ_ONCE(global_pkrs) & ~(3U << shift)) | ((u32)(prot & 3) << shift);
	WRITE_ONCE(global_pkrs, new);
	atomic_long_inc(&updates);
	switch (design) {
	case D_V3:
	case D_V3_RACE:
		v3_walk(new, true);
		break;
	case D_V3_RAW:
		v3_walk(new, false);
		break;
	case D_BROADCAST:
		WRITE_ONCE(global_gen, global_gen + 1);
		broadcast_to(cpu_online_mask, new);
		break;
	case D_LAZY:
		WRITE_ONCE(global_gen, global_gen + 1);
		break;
	case D_HOUSEKEEPING:
		WRITE_ONCE(global_gen, global_gen + 1);
		hk = kmalloc(cpumask_size(), GFP_KERNEL);
		if (!hk)
			break;
		cpumask_andnot(hk, cpu_online_mask, &isolated_mask);
		broadcast_to(hk, new);
		kfree(hk);
		break;
	}
	if (nr_stalls < MAX_STALLS)
		stall_ns[nr_stalls++] = ktime_get_ns() - t0;
	pr_info("pks_test: update %ld pkey=%d prot=%lu pkrs=%#x done\n",
		atomic_long_read(&updates), pkey, prot, new);
}
EXPORT_SYMBOL_GPL(update_global_pkrs);

/* What a thread switch does to PKRS: its value, another, back, and again. */
static void writer_round(void)
{
	u32 base = READ_ONCE(global_pkrs);

	write_pkrs(base);
	write_pkrs(base ^ WRITER_BITS);
	write_pkrs(base);
	write_pkrs(base);
}

/*
 * v3-race: two "threads" take turns on the writer's CPU, as context switches
 * would: one with its own PKRS (pkey 15 access-disabled) that runs most of the
 * time (the nap), and one with the global value, switched in briefly. While the
 * first runs the MSR holds its value, so a remote store of a new global value
 * into the cache makes the second's write_pkrs() a cache hit on a stale MSR.
 */
static void race_round(void)
{
	u32 base = READ_ONCE(global_pkrs);

	write_pkrs(base);
	write_pkrs(base ^ WRITER_BITS);
}

/*
 * Writers poll with a short sleep on a timer pinned to their own CPU. A writer
 * woken by another CPU would take an IPI, and on an isolated CPU the tracer
 * would rightly call that an isolation violation the design did not cause; a
 * spinning writer would steal the host's few cores from the other vCPUs (TCG).
 */
static void writer_nap(void)
{
	ktime_t t = ns_to_ktime(200 * NSEC_PER_USEC);

	set_current_state(TASK_INTERRUPTIBLE);
	schedule_hrtimeout_range(&t, 100 * NSEC_PER_USEC, HRTIMER_MODE_REL_PINNED);
}

static int writer_fn(void *unused)
{
	int seen = 0;

	while (!kthread_should_stop()) {
		int gen = atomic_read(&round_gen);

		if (gen == seen) {
			writer_nap();
			continue;
		}
		seen = gen;
		if (design == D_V3_RACE) {
			/* write while an update walks (trace volume) */
			while (!atomic_read(&race_stop) && !kthread_should_stop()) {
				/* nap between rounds: a spinning vCPU slows the whole TCG guest */
				if (atomic_read(&race_window))
					race_round();
				writer_nap();
			}
		} else {
			writer_round();
		}
		atomic_inc(&writers_done);
	}
	return 0;
}

static void run_writers_round(void)
{
	atomic_set(&writers_done, 0);
	atomic_inc(&round_gen);
	while (atomic_read(&writers_done) < nr_writers)
		usleep_range(20, 50);
}

static int updater_fn(void *unused)
{
	int i;

	while (!kthread_should_stop()) {
		set_current_state(TASK_INTERRUPTIBLE);
		if (atomic_read(&run_state) != 1) {
			schedule();
			continue;
		}
		__set_current_state(TASK_RUNNING);
		if (design == D_V3_RACE) {
			atomic_set(&race_stop, 0);
			atomic_set(&writers_done, 0);
			atomic_inc(&round_gen);
			msleep(1);	/* let the writers get going */
		}
		for (i = 0; i < iterations; i++) {
			int pkey = 1 + i % 14;	/* never pkey 0: the kernel's own pages */
			unsigned long prot = ((READ_ONCE(global_pkrs) >> (2 * pkey)) & 3) ^ 1;

			if (design != D_V3_RACE) {
				run_writers_round();
				update_global_pkrs(pkey, prot);
				continue;
			}
			atomic_set(&race_window, 1);
			udelay(300);	/* writers see the window open before the walk */
			update_global_pkrs(pkey, prot);
			atomic_set(&race_window, 0);
			usleep_range(1000, 2000);
		}
		if (design == D_V3_RACE) {
			atomic_set(&race_stop, 1);
			while (atomic_read(&writers_done) < nr_writers)
				usleep_range(20, 50);
		} else {
			/* a last round lets lazy CPUs pick up the final value */
			run_writers_round();
		}
		atomic_set(&run_state, 2);
		complete(&run_done);
	}
	return 0;
}

static int counters_show(struct seq_file *m, void *v)
{
	int cpu, i;
	u64 calls = 0, hits = 0, msrw = 0, stale = 0, lostr = 0, lazy = 0, hand = 0;

	seq_printf(m, "{\"scenario\": \"%s\", \"state\": %d, \"iterations\": %d, "
		   "\"writers\": %d, \"updater_cpu\": %d, \"pks_cpuid\": %s, \"cr4_pks\": %s, "
		   "\"lost_remote_counted\": %s,\n",
		   design_names[design], atomic_read(&run_state), iterations, nr_writers,
		   updater_cpu, cpu_has_pks ? "true" : "false", cr4_pks_set ? "true" : "false",
		   (wrmsr_kp_on || design > D_V3_RAW) ? "true" : "false");
	seq_printf(m, " \"online_cpus\": \"%*pbl\", \"isolated_cpus\": \"%*pbl\", "
		   "\"writer_cpus\": \"%*pbl\",\n", cpumask_pr_args(cpu_online_mask),
		   cpumask_pr_args(&isolated_mask), cpumask_pr_args(&writer_mask));
	seq_puts(m, " \"per_cpu\": [");
	for_each_online_cpu(cpu) {
		struct pks_stats *st = per_cpu_ptr(&pks_stats, cpu);

		seq_printf(m, "%s\n  {\"cpu\": %d, \"write_pkrs_calls\": %llu, \"cache_hits\": %llu, "
			   "\"msr_writes\": %llu, \"stale_hits\": %llu, \"lost_remote\": %llu, "
			   "\"lazy_applies\": %llu, \"handler_runs\": %llu, \"remote_calls_in\": %ld}",
			   cpu ? "," : "", cpu, st->calls, st->cache_hits, st->msr_writes,
			   st->stale_hits, st->lost_remote, st->lazy_applies, st->handler_runs,
			   atomic_long_read(per_cpu_ptr(&remote_calls_to, cpu)));
		calls += st->calls; hits += st->cache_hits; msrw += st->msr_writes;
		stale += st->stale_hits; lostr += st->lost_remote; lazy += st->lazy_applies;
		hand += st->handler_runs;
	}
	seq_puts(m, "],\n");
	seq_printf(m, " \"write_pkrs_calls\": %llu, \"cache_hits\": %llu, "
		   "\"module_msr_writes\": %llu, \"stale_hits\": %llu, \"lost_remote\": %llu, "
		   "\"lost_updates\": %llu, \"lazy_applies\": %llu, \"handler_runs\": %llu,\n",
		   calls, hits, msrw, stale, lostr, stale + lostr, lazy, hand);
	seq_printf(m, " \"updates\": %ld, \"broadcasts\": %ld, \"remote_calls\": %ld, "
		   "\"local_calls\": %ld, \"isolated_hits\": %ld, \"walked_cpus\": %ld,\n",
		   atomic_long_read(&updates), atomic_long_read(&broadcasts),
		   atomic_long_read(&remote_calls), atomic_long_read(&local_calls),
		   atomic_long_read(&isolated_hits), walked_cpus);
	if (drift_min == LONG_MAX)
		seq_puts(m, " \"preempt_drift_min\": null, \"preempt_drift_max\": null,\n");
	else
		seq_printf(m, " \"preempt_drift_min\": %ld, \"preempt_drift_max\": %ld,\n",
			   drift_min, drift_max);
	seq_puts(m, " \"update_stall_ns\": [");
	for (i = 0; i < nr_stalls; i++)
		seq_printf(m, "%s%llu", i ? ", " : "", stall_ns[i]);
	seq_puts(m, "]}\n");
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(counters);

static ssize_t control_write(struct file *f, const char __user *ubuf, size_t len, loff_t *off)
{
	char buf[16] = {};

	if (copy_from_user(buf, ubuf, min(len, sizeof(buf) - 1)))
		return -EFAULT;
	if (strncmp(buf, "run", 3))
		return -EINVAL;
	if (atomic_cmpxchg(&run_state, 0, 1) != 0)
		return -EBUSY;
	wake_up_process(updater_task);
	if (wait_for_completion_interruptible(&run_done))
		return -EINTR;
	return len;
}

static const struct file_operations control_fops = {
	.owner = THIS_MODULE,
	.write = control_write,
};

static void enable_pks(void *unused)
{
	cr4_set_bits(1UL << CR4_PKS_BIT);
	wrmsrl(MSR_IA32_PKRS_NR, 0);
}

static void disable_pks(void *unused)
{
	wrmsrl(MSR_IA32_PKRS_NR, 0);
	cr4_clear_bits(1UL << CR4_PKS_BIT);
}

static void pick_writer_cpus(void)
{
	int cpu, want = min_t(int, threads, num_online_cpus() - 1);

	cpumask_clear(&writer_mask);
	for_each_cpu_and(cpu, &isolated_mask, cpu_online_mask) {
		if (cpumask_weight(&writer_mask) >= want)
			return;
		if (cpu != updater_cpu)
			cpumask_set_cpu(cpu, &writer_mask);
	}
	for (cpu = nr_cpu_ids - 1; cpu >= 0; cpu--) {
		if (cpumask_weight(&writer_mask) >= want)
			return;
		if (cpu_online(cpu) && cpu != updater_cpu)
			cpumask_set_cpu(cpu, &writer_mask);
	}
}

static void stop_threads(void)
{
	int i;

	for (i = 0; i < nr_writers; i++)
		if (writer_tasks[i])
			kthread_stop(writer_tasks[i]);
	if (updater_task)
		kthread_stop(updater_task);
}

static int __init pks_test_init(void)
{
	unsigned int eax, ebx, ecx, edx;
	int i, cpu;

	for (i = 0; i < ARRAY_SIZE(design_names); i++)
		if (!strcmp(scenario, design_names[i]))
			break;
	if (i == ARRAY_SIZE(design_names)) {
		pr_err("pks_test: unknown scenario '%s'\n", scenario);
		return -EINVAL;
	}
	design = i;
	if (iterations < 1 || threads < 0 || !cpu_online(updater_cpu))
		return -EINVAL;

	cpuid_count(7, 0, &eax, &ebx, &ecx, &edx);
	cpu_has_pks = ecx & CPUID7_ECX_PKS;
	if (cpu_has_pks) {
		/* PKRS only guards pages whose pkey != 0; the kernel's are all 0. */
		on_each_cpu(enable_pks, NULL, 1);
		cr4_pks_set = true;
	} else {
		pr_warn("pks_test: CPU lacks PKS (CPUID.7.0:ECX[31]); MSR 0x6e1 writes may fault\n");
	}

	if (design <= D_V3_RAW) {
		int err = register_kprobe(&wrmsr_kp);

		wrmsr_kp_on = !err;
		if (err)
			pr_warn("pks_test: kprobe on __wrmsr_on_cpu failed (%d): lost_remote not counted\n",
				err);
	}

	for_each_online_cpu(cpu)
		if (!housekeeping_test_cpu(cpu, HK_TYPE_DOMAIN) ||
		    !housekeeping_test_cpu(cpu, HK_TYPE_TICK))
			cpumask_set_cpu(cpu, &isolated_mask);

	stall_ns = kcalloc(MAX_STALLS, sizeof(*stall_ns), GFP_KERNEL);
	writer_tasks = kcalloc(nr_cpu_ids, sizeof(*writer_tasks), GFP_KERNEL);
	if (!stall_ns || !writer_tasks)
		goto nomem;

	updater_task = kthread_create_on_cpu(updater_fn, NULL, updater_cpu, "pks_updater");
	if (IS_ERR(updater_task)) {
		updater_task = NULL;
		goto nomem;
	}
	wake_up_process(updater_task);

	pick_writer_cpus();
	for_each_cpu(cpu, &writer_mask) {
		struct task_struct *t = kthread_create_on_cpu(writer_fn, NULL, cpu, "pks_writer/%u");

		if (IS_ERR(t))
			continue;
		writer_tasks[nr_writers++] = t;
		wake_up_process(t);
	}

	dbg_dir = debugfs_create_dir("pks_test", NULL);
	debugfs_create_file("control", 0200, dbg_dir, NULL, &control_fops);
	debugfs_create_file("counters", 0444, dbg_dir, NULL, &counters_fops);
	pr_info("pks_test: scenario %s, %d iterations, %d writers on %*pbl, isolated %*pbl, pks %d\n",
		design_names[design], iterations, nr_writers, cpumask_pr_args(&writer_mask),
		cpumask_pr_args(&isolated_mask), cpu_has_pks);
	return 0;
nomem:
	stop_threads();
	if (wrmsr_kp_on)
		unregister_kprobe(&wrmsr_kp);
	kfree(stall_ns);
	kfree(writer_tasks);
	if (cr4_pks_set)
		on_each_cpu(disable_pks, NULL, 1);
	return -ENOMEM;
}

static void __exit pks_test_exit(void)
{
	debugfs_remove_recursive(dbg_dir);
	if (atomic_read(&run_state) == 1)
		wait_for_completion(&run_done);
	stop_threads();
	if (wrmsr_kp_on)
		unregister_kprobe(&wrmsr_kp);
	if (cr4_pks_set)
		on_each_cpu(disable_pks, NULL, 1);
	kfree(stall_ns);
	kfree(writer_tasks);
}

module_init(pks_test_init);
module_exit(pks_test_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("PKS review code paths (PKRS cache, global updates) for pkstrace");
