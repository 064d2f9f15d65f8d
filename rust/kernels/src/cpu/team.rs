//! Teams: `n` threads of the pool running one program at the same time and meeting at a
//! spin [`Barrier`] between phases ([`team`]), for work made of many short dependent steps
//! where a pool region per step would cost more than the step (the fused decode step).
//!
//! **Protocol.** Buffers shared by a team are [`TeamBuf`]s: within one phase (between two
//! barriers) a buffer is either only read, or written in parts that belong to exactly one
//! thread (and read by that thread only); the barrier's acquire/release orders the
//! phases. The accessors are `unsafe` because the caller vouches for this protocol. Work
//! is cut into fixed tasks ([`share`]) whose results do not depend on which thread runs
//! them, so the output is bitwise independent of the team's size.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::pool::pool;

/// Serialises teams: two teams sharing the pool's threads could each hold one thread at
/// a barrier waiting for a thread the other holds.
static TEAM: Mutex<()> = Mutex::new(());

/// Spin barrier of a [`team`] (spins briefly, then yields: on a loaded machine a member
/// may be descheduled). `wait` has acquire/release semantics: what a member wrote before
/// it is visible to every member after it.
pub struct Barrier {
    n: usize,
    count: AtomicUsize,
    gen: AtomicUsize,
}

impl Barrier {
    pub fn new(n: usize) -> Self {
        Barrier {
            n,
            count: AtomicUsize::new(0),
            gen: AtomicUsize::new(0),
        }
    }

    pub fn wait(&self) {
        if self.n <= 1 {
            return;
        }
        let g = self.gen.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.gen.fetch_add(1, Ordering::Release);
        } else {
            let mut spins = 0u32;
            while self.gen.load(Ordering::Acquire) == g {
                if spins < 4_000 {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Runs `f(index, n, barrier)` for `index` in `0..n` on `n` threads at the same time (the
/// caller is member 0, the pool's threads the others), for work whose members meet at
/// `barrier` (sized to the actual team). `n` is capped by the pool's size; `n == 1` (or
/// no pool) runs `f(0, 1, barrier)` on the caller.
pub fn team<F: Fn(usize, usize, &Barrier) + Sync>(n: usize, f: F) {
    let pool = if n > 1 { pool() } else { None };
    let Some(p) = pool else {
        f(0, 1, &Barrier::new(1));
        return;
    };
    let n = n.min(p.current_num_threads() + 1).max(1);
    let bar = Barrier::new(n);
    let _guard = TEAM.lock().unwrap_or_else(|e| e.into_inner());
    // Members 1.. are spawned jobs: each pool thread that picks one up spins at the
    // barriers until the others arrive, so no thread runs two members of one team and,
    // with teams serialised, the others always get a thread.
    p.in_place_scope(|s| {
        for i in 1..n {
            let (f, bar) = (&f, &bar);
            s.spawn(move |_| f(i, n, bar));
        }
        f(0, n, &bar);
    });
}

/// A buffer shared by a team (see the module doc for the protocol that makes the
/// accessors sound).
pub struct TeamBuf<'a, T> {
    ptr: *mut T,
    len: usize,
    _m: PhantomData<&'a mut [T]>,
}

// SAFETY: a TeamBuf is a `&mut [T]` handed to several threads; the team protocol (module
// doc), which every user of the accessors follows, guarantees that no element is written
// by one thread while another accesses it.
unsafe impl<T: Send> Send for TeamBuf<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for TeamBuf<'_, T> {}

impl<'a, T> TeamBuf<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        TeamBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _m: PhantomData,
        }
    }

    /// Elements `r`, to write.
    ///
    /// # Safety
    /// In the current phase no other thread accesses any element of `r`, and this thread
    /// holds no other reference to them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, r: Range<usize>) -> &mut [T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "TeamBuf range out of bounds"
        );
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }

    /// Elements `r`, to read.
    ///
    /// # Safety
    /// In the current phase no thread writes any element of `r`.
    pub unsafe fn view(&self, r: Range<usize>) -> &[T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "TeamBuf range out of bounds"
        );
        // SAFETY: in bounds (checked); not written concurrently by the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(r.start), r.end - r.start) }
    }

    /// The whole buffer, to read.
    ///
    /// # Safety
    /// Same contract as [`TeamBuf::view`].
    pub unsafe fn all(&self) -> &[T] {
        // SAFETY: forwarded contract.
        unsafe { self.view(0..self.len) }
    }
}

/// Part `t` of `n` items cut into `nt` nearly equal consecutive ranges.
#[inline]
pub fn share(n: usize, t: usize, nt: usize) -> Range<usize> {
    n * t / nt..n * (t + 1) / nt
}
