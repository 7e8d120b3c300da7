//! The backend's worker threads: each call runs one worker per thread, and the workers pull
//! tasks from a shared atomic queue (dynamic load balancing for masks).

use crate::device::Isa;
use crate::lowp::Lowp;
#[cfg(target_arch = "x86_64")]
use crate::lowp::{Avx512Bf16, Avx512Fp16};
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fixed-size thread pool, or the calling thread alone.
pub(crate) struct ThreadPool {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads; one thread (or a pool that cannot be created) runs
    /// everything on the calling thread.
    pub fn new(threads: usize) -> ThreadPool {
        let pool = (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("flashattn-cpu-{i}"))
                    .build()
                    .ok()
            })
            .flatten();
        let threads = if pool.is_some() { threads } else { 1 };
        ThreadPool { pool, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `worker` on `min(tasks, threads)` threads at once and waits for all of them.
    pub fn run(&self, tasks: usize, worker: &(dyn Fn() + Sync)) {
        let n = tasks.min(self.threads);
        match &self.pool {
            Some(pool) if n > 1 => pool.scope(|s| {
                for _ in 0..n {
                    s.spawn(|_| worker());
                }
            }),
            _ if tasks > 0 => worker(),
            _ => {}
        }
    }
}

/// A shared queue of task indices `0..len`, handed out in order, each exactly once.
pub(crate) struct TaskQueue {
    next: AtomicUsize,
    len: usize,
}

impl TaskQueue {
    pub fn new(len: usize) -> TaskQueue {
        TaskQueue {
            next: AtomicUsize::new(0),
            len,
        }
    }

    /// The next task, or `None` once every task has been handed out.
    #[inline]
    pub fn take(&self) -> Option<usize> {
        let t = self.next.fetch_add(1, Ordering::Relaxed);
        (t < self.len).then_some(t)
    }
}

/// Work that the pool's workers run task by task, with the micro-kernels of the instruction
/// set chosen at run time (the forward, the backward).
pub(crate) trait Kernel: Sync {
    type Task: Copy;
    type Scratch;
    /// One worker's scratch (made once per worker and call).
    fn scratch(&self) -> Self::Scratch;
    /// Every task, in the order the workers take them.
    fn tasks(&self) -> &[Self::Task];
    /// Runs one task. Implementations are `#[inline(always)]`, so that they are compiled
    /// inside the `#[target_feature]` entry points below.
    ///
    /// # Safety
    /// This CPU has `S`'s instructions.
    unsafe fn run_task<S: Simd>(&self, sc: &mut Self::Scratch, task: Self::Task);
    /// Runs one task on a low-precision level: the kernels that have low-precision tiles
    /// use them here for f16 / bf16 inputs; the default runs the f32 tiles.
    ///
    /// # Safety
    /// This CPU has `L`'s instructions.
    #[inline(always)]
    unsafe fn run_task_low<L: Lowp>(&self, sc: &mut Self::Scratch, task: Self::Task) {
        self.run_task::<L>(sc, task)
    }
}

impl ThreadPool {
    /// Runs `kernel`'s tasks on up to one worker per thread with `isa`'s micro-kernels.
    pub fn run_kernel<K: Kernel>(&self, isa: Isa, kernel: &K) {
        let queue = TaskQueue::new(kernel.tasks().len());
        self.run(kernel.tasks().len(), &|| {
            let mut sc = kernel.scratch();
            // SAFETY: a backend only holds an `Isa` that `Isa::available()` confirmed.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Fp16 => worker_fp16(kernel, &queue, &mut sc),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Bf16 => worker_bf16(kernel, &queue, &mut sc),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => worker_avx512(kernel, &queue, &mut sc),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => worker_avx2(kernel, &queue, &mut sc),
                    _ => worker::<Portable, K>(kernel, &queue, &mut sc),
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512fp16,f16c")]
unsafe fn worker_fp16<K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    worker_low::<Avx512Fp16, K>(kernel, queue, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn worker_bf16<K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    worker_low::<Avx512Bf16, K>(kernel, queue, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn worker_avx512<K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    worker::<Avx512, K>(kernel, queue, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn worker_avx2<K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    worker::<Avx2, K>(kernel, queue, sc)
}

/// Pulls tasks until none is left.
#[inline(always)]
unsafe fn worker<S: Simd, K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    let tasks = kernel.tasks();
    while let Some(t) = queue.take() {
        kernel.run_task::<S>(sc, tasks[t]);
    }
}

/// Pulls tasks until none is left, on a low-precision level.
#[inline(always)]
unsafe fn worker_low<L: Lowp, K: Kernel>(kernel: &K, queue: &TaskQueue, sc: &mut K::Scratch) {
    let tasks = kernel.tasks();
    while let Some(t) = queue.take() {
        kernel.run_task_low::<L>(sc, tasks[t]);
    }
}
