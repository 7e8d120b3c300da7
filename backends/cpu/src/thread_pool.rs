//! The backend's worker threads: each call runs one worker per thread, and the workers pull
//! tasks from a shared atomic queue (dynamic load balancing for masks).

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
