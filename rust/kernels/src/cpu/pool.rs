//! The kernels' own rayon pool: sized explicitly, rebuilt after `fork`. Teams of threads
//! that meet at barriers run on it too (see [`super::team`]).
//!
//! Work is always cut into the same tasks whatever the thread count, and every task
//! writes its own outputs, so results are bitwise independent of the number of threads.

use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
}

static POOL: Mutex<PoolState> = Mutex::new(PoolState {
    pid: 0,
    threads: 0,
    pool: None,
});

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The most threads the pool may have: far above any core count a kernel can use, and low
/// enough that building the pool cannot exhaust the process's threads or memory.
pub const MAX_THREADS: usize = 1024;

/// Sets the number of threads kernels may use (1 ..= [`MAX_THREADS`]).
pub fn set_num_threads(n: usize) -> Result<()> {
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(Error::value("num_threads", "in [1, 1024]", n));
    }
    let mut st = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if st.threads != n {
        st.threads = n;
        // Dropping the old pool joins nothing: rayon threads exit on their own.
        st.pool = None;
    }
    Ok(())
}

pub fn num_threads() -> usize {
    let st = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if st.threads == 0 {
        default_threads()
    } else {
        st.threads
    }
}

/// The pool for this process, creating it on first use and again in a forked child
/// (whose copy of the parent's pool has no threads behind it).
pub(super) fn pool() -> Option<Arc<rayon::ThreadPool>> {
    let mut st = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if st.pid != pid {
        // Inherited across fork: the worker threads do not exist here. Leak the handle
        // instead of dropping it, since dropping would signal threads that never run.
        if let Some(old) = st.pool.take() {
            std::mem::forget(old);
        }
        st.pid = pid;
    }
    if st.threads == 0 {
        st.threads = default_threads();
    }
    if st.threads == 1 {
        return None;
    }
    if st.pool.is_none() {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(st.threads)
            .thread_name(|i| format!("bmojo-{i}"))
            .build();
        st.pool = built.ok().map(Arc::new);
    }
    st.pool.clone()
}

/// Runs `f(i, item)` for every item, in parallel when there is enough `work` (a rough
/// count of elementary operations) to pay for waking the pool.
pub fn for_each<I: Send, F: Fn(usize, I) + Sync + Send>(items: Vec<I>, work: usize, f: F) {
    // About 0.2 ms of work on one core. Below it, waking the pool costs more than it saves
    // whenever the call follows a torch matmul, whose OpenMP workers keep spinning on the
    // cores for milliseconds afterwards (benches/interleaved.py).
    const MIN_PARALLEL_WORK: usize = 1 << 19;
    if items.len() > 1 && work >= MIN_PARALLEL_WORK {
        if let Some(p) = pool() {
            p.install(|| {
                items
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(i, it)| f(i, it))
            });
            return;
        }
    }
    for (i, it) in items.into_iter().enumerate() {
        f(i, it);
    }
}

/// Splits `data` into consecutive pieces of the given lengths (which must add up to at
/// most `data.len()`): the safe way to hand each task its own output rows.
pub fn split_lengths<'a, T>(mut data: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(l);
        out.push(head);
        data = tail;
    }
    out
}
