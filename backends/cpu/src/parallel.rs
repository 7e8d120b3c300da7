//! The backend's worker threads: each forward call runs one worker per thread, and the
//! workers pull tasks from a shared atomic queue (dynamic load balancing for masks).

/// A fixed-size thread pool, or the calling thread alone.
pub(crate) struct Pool {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl Pool {
    /// A pool of `threads` threads; one thread (or a pool that cannot be created) runs
    /// everything on the calling thread.
    pub fn new(threads: usize) -> Pool {
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
        Pool { pool, threads }
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
