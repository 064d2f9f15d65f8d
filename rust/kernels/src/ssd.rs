//! Mamba-2's multi-head SSD scan (design §2.4), forward and backward.
//!
//! Layout (mamba_ssm's): `x`, `z` `(batch, len, heads, P)`; `dt` `(batch, len, heads)`;
//! `A`, `dt_bias` `(heads,)`; `B`, `C` `(batch, len, groups, N)`; `D` `(heads,)` or
//! `(heads, P)`; states `(batch, heads, P, N)`. Outputs are head-major: `out`, `dx`, `dz`
//! `(batch, heads, len, P)`, `ddt` `(batch, heads, len)`, so that each task writes one
//! contiguous block (the Python op hands them back as transposed views).
//!
//! **Algorithm: the direct recurrence.** One task per (batch row, head) keeps the head's
//! whole `(P, N)` state in L1 (32 KiB at P = 64, N = 128 in float32) and walks time:
//! `S = a_t·S + (Δ_t x_t) ⊗ B_t`, `y_t = S·C_t + D x_t`, vectorised along N. The decay
//! is one scalar per (token, head), computed once. Per state element and step that is one
//! multiply and two FMAs on data already in L1: measured on the 2-core AMD EPYC (AVX-512)
//! this reaches more of the FMA peak than the chunked (matrix-product) SSD does through
//! torch's GEMMs at Mamba-2's shapes (head dim 64, chunk 256: the chunked form does
//! ~3× the arithmetic for its intra-chunk L×L products and streams its decay matrices
//! through memory); see `docs/design.md` §2.4 for the figures.
//!
//! The forward writes the state before every [`CHUNK`] steps (`ckpt`,
//! `(batch, heads, n_chunks, P, N)`); the backward walks the chunks in reverse,
//! recomputes each chunk's states from its checkpoint and runs the adjoint recurrence, so
//! its memory is O(state · L / CHUNK). Tasks are fixed by the shapes, never by the thread
//! count, and the sums over heads and batch rows run in a fixed order afterwards, so the
//! results are bitwise independent of the number of threads.

use crate::cpu::pool;
use crate::cpu::{
    dispatch, exp, sigmoid, softplus, sum_vectors, Elem, Kernel, Level, SimdElem, Vector,
};
use crate::error::{check_lens, Error, Result};

/// Time steps per checkpoint.
pub const CHUNK: usize = 64;

/// Inputs of an SSD scan, all contiguous in the layouts of the module doc.
#[derive(Clone, Copy, Debug)]
pub struct SsdArgs<'a, T> {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub hdim: usize,
    pub groups: usize,
    pub dstate: usize,
    pub x: &'a [T],
    pub dt: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    /// `(heads,)` or `(heads, P)`.
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub dt_bias: Option<&'a [T]>,
    pub h0: Option<&'a [T]>,
    pub seq_idx: Option<&'a [i64]>,
    pub softplus: bool,
    /// Δ clamped to `[lo, hi]` after the softplus (mamba_ssm's `dt_limit`), when given.
    pub limit: Option<(T, T)>,
    /// Distances between consecutive (batch, time) rows of the per-token inputs.
    pub rows: RowStrides,
}

/// Row strides (in elements) of the per-token inputs: row `(b, t)` of `x` starts at
/// `(b·len + t)·x`. Mamba-2 blocks pass `x`, `B`, `C`, `dt` as column slices of one
/// projection, so reading them in place saves a copy of each; the natural strides are
/// those of contiguous arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowStrides {
    pub x: usize,
    pub dt: usize,
    pub b: usize,
    pub c: usize,
    pub z: usize,
}

impl RowStrides {
    /// The strides of contiguous inputs.
    pub fn natural(heads: usize, hdim: usize, groups: usize, dstate: usize) -> Self {
        RowStrides {
            x: heads * hdim,
            dt: heads,
            b: groups * dstate,
            c: groups * dstate,
            z: heads * hdim,
        }
    }
}

/// Elements a strided input of `rows` rows of `width` spans (`usize::MAX`, which no
/// slice matches, if that overflows).
fn span(rows: usize, stride: usize, width: usize) -> usize {
    if rows == 0 {
        return 0;
    }
    (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(width))
        .unwrap_or(usize::MAX)
}

pub fn n_chunks(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

impl<T: Elem> SsdArgs<'_, T> {
    /// Checks every buffer length against the declared sizes.
    pub fn validate(&self) -> Result<()> {
        let (bt, l, h, p, g, n) = (
            self.batch,
            self.len,
            self.heads,
            self.hdim,
            self.groups,
            self.dstate,
        );
        if n == 0 || p == 0 || h == 0 {
            return Err(Error::expected(
                "x",
                "heads, head_dim and N (of B) all >= 1",
            ));
        }
        if g == 0 || h % g != 0 {
            return Err(Error::invalid(
                "B",
                format!("{g} groups do not divide {h} heads"),
            ));
        }
        if let Some(d) = self.d {
            if d.len() != h && d.len() != h * p {
                return Err(Error::len("D", h * p, d.len()));
            }
        }
        if let Some((lo, hi)) = self.limit {
            if lo
                .partial_cmp(&hi)
                .is_none_or(|o| o == core::cmp::Ordering::Greater)
            {
                return Err(Error::expected("dt_limit", "low <= high"));
            }
        }
        // Every size the kernels multiply out must fit: the largest is a state per
        // (batch, head) and per time step (the checkpoints) or an output of (b, h, l, p).
        let fits = [bt, l, h, p, n]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x.max(1)))
            .is_some_and(|x| x.checked_mul(g.max(1) * 8).is_some());
        if !fits {
            return Err(Error::expected("x", "sizes whose product fits in memory"));
        }
        let (rs, rows) = (self.rows, bt * l);
        for (name, stride, width) in [
            ("x", rs.x, h * p),
            ("dt", rs.dt, h),
            ("B", rs.b, g * n),
            ("C", rs.c, g * n),
            ("z", rs.z, h * p),
        ] {
            if stride < width {
                return Err(Error::value(
                    name,
                    format!("a row stride >= {width}"),
                    stride,
                ));
            }
        }
        let z_span = span(rows, rs.z, h * p);
        check_lens(&[
            ("x", self.x.len(), span(rows, rs.x, h * p)),
            ("dt", self.dt.len(), span(rows, rs.dt, h)),
            ("A", self.a.len(), h),
            ("B", self.b.len(), span(rows, rs.b, g * n)),
            ("C", self.c.len(), span(rows, rs.c, g * n)),
            ("z", self.z.map_or(z_span, <[T]>::len), z_span),
            ("dt_bias", self.dt_bias.map_or(h, <[T]>::len), h),
            (
                "initial_states",
                self.h0.map_or(bt * h * p * n, <[T]>::len),
                bt * h * p * n,
            ),
            ("seq_idx", self.seq_idx.map_or(bt * l, <[i64]>::len), bt * l),
        ])
    }

    fn tasks(&self) -> Vec<Task> {
        (0..self.batch)
            .flat_map(|b| (0..self.heads).map(move |h| Task { b, h }))
            .collect()
    }

    #[inline(always)]
    fn reset(&self, b: usize, t: usize) -> bool {
        match self.seq_idx {
            Some(s) => t > 0 && s[b * self.len + t] != s[b * self.len + t - 1],
            None => false,
        }
    }

    #[inline(always)]
    fn d_at(&self, h: usize, r: usize) -> T {
        match self.d {
            Some(d) if d.len() == self.heads => d[h],
            Some(d) => d[h * self.hdim + r],
            None => T::ZERO,
        }
    }

    /// Offset of `x[b, t, h, 0]` (and of that row of the input gradient).
    #[inline(always)]
    fn xrow(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.len + t) * self.rows.x + h * self.hdim
    }

    /// Offset of `z[b, t, h, 0]`.
    #[inline(always)]
    fn zrow(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.len + t) * self.rows.z + h * self.hdim
    }

    /// Offsets of `B[b, t, group(h), 0]` and `C[b, t, group(h), 0]`.
    #[inline(always)]
    fn bcrow(&self, b: usize, t: usize, h: usize) -> (usize, usize) {
        let grp = h / (self.heads / self.groups) * self.dstate;
        let r = b * self.len + t;
        (r * self.rows.b + grp, r * self.rows.c + grp)
    }
}

#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    h: usize,
}

/// `f(x)` for one element through the vector math of the scalar level (the same
/// polynomial at every SIMD level, so the per-step scalars do not depend on the level).
#[inline(always)]
fn scalar<T: SimdElem>(x: T, f: fn(T::Scalar) -> T::Scalar) -> T {
    let mut o = [T::ZERO];
    f(T::Scalar::splat(x)).store(&mut o);
    o[0]
}

/// Per step of one task: Δ, the decay `a = exp(Δ·A)` and what the backward needs to
/// differentiate Δ (`ddt = gate · dΔ`).
struct Steps<T> {
    delta: Vec<T>,
    decay: Vec<T>,
    /// dΔ/d(dt): softplus' and the clamp's pass-through (empty in the forward).
    gate: Vec<T>,
}

#[inline(always)]
fn steps<T: SimdElem>(s: &SsdArgs<'_, T>, t: Task, grad: bool) -> Steps<T> {
    let l = s.len;
    let a = s.a[t.h];
    let bias = s.dt_bias.map_or(T::ZERO, |x| x[t.h]);
    let mut st = Steps {
        delta: Vec::with_capacity(l),
        decay: Vec::with_capacity(l),
        gate: Vec::with_capacity(if grad { l } else { 0 }),
    };
    for k in 0..l {
        let pre = s.dt[(t.b * l + k) * s.rows.dt + t.h] + bias;
        let mut d = if s.softplus {
            scalar(pre, softplus)
        } else {
            pre
        };
        let mut pass = T::ONE;
        if let Some((lo, hi)) = s.limit {
            // torch.clamp: the gradient passes where lo <= Δ <= hi.
            if d < lo || d > hi {
                pass = T::ZERO;
            }
            d = if d < lo {
                lo
            } else if d > hi {
                hi
            } else {
                d
            };
        }
        st.delta.push(d);
        st.decay.push(scalar(d * a, exp));
        if grad {
            // Mamba's softplus is the identity above its threshold.
            let sp = if s.softplus && pre <= T::SOFTPLUS_THRESHOLD {
                scalar(pre, sigmoid)
            } else {
                T::ONE
            };
            st.gate.push(pass * sp);
        }
    }
    st
}

/// Copies the first `n` values of a row into `dst` (padded to whole vectors, zeros past
/// `n`).
#[inline(always)]
fn load_row<V: Vector>(src: &[V::E], n: usize, dst: &mut [V], tmp: &mut [V::E]) {
    let w = V::W;
    for (j, v) in dst.iter_mut().enumerate() {
        let lo = j * w;
        *v = if lo + w <= n {
            V::load(&src[lo..])
        } else {
            tmp[..w].fill(V::E::ZERO);
            tmp[..n - lo].copy_from_slice(&src[lo..n]);
            V::load(tmp)
        };
    }
}

/// Inverse of [`load_row`]: the first `n` lanes of `src` into `dst[..n]`.
#[inline(always)]
fn store_row<V: Vector>(src: &[V], n: usize, dst: &mut [V::E], tmp: &mut [V::E]) {
    let w = V::W;
    for (j, v) in src.iter().enumerate() {
        let lo = j * w;
        if lo + w <= n {
            v.store(&mut dst[lo..]);
        } else {
            v.store(tmp);
            dst[lo..n].copy_from_slice(&tmp[..n - lo]);
        }
    }
}

#[inline(always)]
fn silu<T: SimdElem>(z: T) -> (T, T) {
    let sg = scalar(z, sigmoid);
    (z * sg, sg)
}

// --------------------------------------------------------------------------------------
// Forward
// --------------------------------------------------------------------------------------

/// Where a forward task writes its outputs.
enum OutRows<'s, T> {
    /// Head-major: this task's own `(len, P)` block.
    Own(&'s mut [T]),
    /// Token-major `(batch, len, heads, P)`, shared by all tasks (each writes only its own
    /// (batch row, head) rows).
    Shared(&'s TokenMajor<T>),
}

/// The token-major output `(batch, len, heads, P)` written by every task at once: task
/// (b, h) writes exactly the elements `[b, t, h, 0..P)` for every t, so the tasks' index
/// sets are disjoint. Saves the head-major → token-major copy of the output.
struct TokenMajor<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: a TokenMajor is only made in `forward` from a `&mut [T]` that stays borrowed for
// as long as the tasks run (so nothing else reads or writes it), and the tasks write
// disjoint elements of it (see `write`): sharing it between threads creates no data race.
unsafe impl<T: Send> Send for TokenMajor<T> {}
// SAFETY: as above; `&TokenMajor` only allows writes at disjoint indices.
unsafe impl<T: Send> Sync for TokenMajor<T> {}

impl<T: Copy> TokenMajor<T> {
    /// Writes `v` at index `i` (< `len`, checked). Callers write each index from one task
    /// only: the task of (batch row, head) writes the indices of its own rows.
    #[inline(always)]
    fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "token-major output index out of range");
        // SAFETY: `i < len` keeps the write inside the borrowed slice, which outlives every
        // task; no two tasks write the same index and nobody reads the slice while the
        // tasks run, so this write races with nothing.
        unsafe { self.ptr.add(i).write(v) }
    }
}

struct Fwd<'s, 'a, T> {
    s: &'s SsdArgs<'a, T>,
    t: Task,
    out: OutRows<'s, T>,
    /// `(P, N)`.
    last: &'s mut [T],
    /// `(n_chunks, P, N)`, or empty when no backward will follow.
    ckpt: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for Fwd<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Fwd {
            s,
            t,
            mut out,
            last,
            ckpt,
        } = self;
        let (w, n, p, l) = (V::W, s.dstate, s.hdim, s.len);
        let nv = n.div_ceil(w);
        let mut tmp = vec![T::ZERO; w];
        let st = steps(s, t, false);
        let mut state = vec![V::zero(); p * nv];
        if let Some(h0) = s.h0 {
            let base = (t.b * s.heads + t.h) * p * n;
            for r in 0..p {
                let src = &h0[base + r * n..][..n];
                load_row(src, n, &mut state[r * nv..(r + 1) * nv], &mut tmp);
            }
        }
        let (mut bv, mut cv) = (vec![V::zero(); nv], vec![V::zero(); nv]);
        let mut acc = vec![V::zero(); p];
        let mut ys = vec![T::ZERO; p];
        for k in 0..l {
            if k % CHUNK == 0 && !ckpt.is_empty() {
                let c = k / CHUNK;
                for r in 0..p {
                    let dst = &mut ckpt[(c * p + r) * n..][..n];
                    store_row(&state[r * nv..(r + 1) * nv], n, dst, &mut tmp);
                }
            }
            if s.reset(t.b, k) {
                state.fill(V::zero());
            }
            let (bo, co) = s.bcrow(t.b, k, t.h);
            load_row(&s.b[bo..], n, &mut bv, &mut tmp);
            load_row(&s.c[co..], n, &mut cv, &mut tmp);
            let (delta, av) = (st.delta[k], V::splat(st.decay[k]));
            let xs = &s.x[s.xrow(t.b, k, t.h)..][..p];
            // B and C in registers for the common state widths (Mamba-2's N = 64 / 128 /
            // 256 are 4 / 8 / 16 vectors at AVX-512); the same operations in the same order.
            match nv {
                4 => rows_fixed::<V, 4>(&mut state, &bv, &cv, xs, delta, av, &mut acc),
                8 => rows_fixed::<V, 8>(&mut state, &bv, &cv, xs, delta, av, &mut acc),
                16 => rows_fixed::<V, 16>(&mut state, &bv, &cv, xs, delta, av, &mut acc),
                _ => {
                    for (r, &xr) in xs.iter().enumerate() {
                        let dx = V::splat(delta * xr);
                        let row = &mut state[r * nv..(r + 1) * nv];
                        let mut y = V::zero();
                        for ((sv, &b), &c) in row.iter_mut().zip(&bv).zip(&cv) {
                            let h = sv.fma(av, dx.mul(b));
                            *sv = h;
                            y = h.fma(c, y);
                        }
                        acc[r] = y;
                    }
                }
            }
            sum_vectors(&acc, &mut ys);
            for (r, &y) in ys.iter().enumerate() {
                let xr = xs[r];
                let mut v = y + s.d_at(t.h, r) * xr;
                if let Some(z) = s.z {
                    v = v * silu(z[s.zrow(t.b, k, t.h) + r]).0;
                }
                match &mut out {
                    OutRows::Own(o) => o[k * p + r] = v,
                    OutRows::Shared(o) => o.write(((t.b * l + k) * s.heads + t.h) * p + r, v),
                }
            }
        }
        for r in 0..p {
            store_row(
                &state[r * nv..(r + 1) * nv],
                n,
                &mut last[r * n..(r + 1) * n],
                &mut tmp,
            );
        }
    }
}

/// One step of every state row with `NV` vectors per row: `S_r = a·S_r + (Δ x_r) B`,
/// `acc_r = S_r · C` (lane-wise partial sums), with B and C held in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_fixed<V: Vector, const NV: usize>(
    state: &mut [V],
    bv: &[V],
    cv: &[V],
    xs: &[V::E],
    delta: V::E,
    av: V,
    acc: &mut [V],
) {
    // Copied into fixed-size arrays (not built by a closure: closures lose the level's
    // target features, see `dispatch`).
    let (mut b, mut c) = ([V::zero(); NV], [V::zero(); NV]);
    b.copy_from_slice(&bv[..NV]);
    c.copy_from_slice(&cv[..NV]);
    for ((row, &xr), a) in state.chunks_exact_mut(NV).zip(xs).zip(acc.iter_mut()) {
        let dx = V::splat(delta * xr);
        let mut y = V::zero();
        for j in 0..NV {
            let h = row[j].fma(av, dx.mul(b[j]));
            row[j] = h;
            y = h.fma(c[j], y);
        }
        *a = y;
    }
}

/// Outputs of the forward: `out (batch, heads, len, P)` (or `(batch, len, heads, P)` if
/// `token_major`), `last (batch, heads, P, N)` and the checkpoints `(batch, heads,
/// n_chunks(len), P, N)` (empty: none, for inference).
pub struct FwdOut<'a, T> {
    pub out: &'a mut [T],
    pub token_major: bool,
    pub last: &'a mut [T],
    pub ckpt: &'a mut [T],
}

pub fn forward<T: SimdElem>(level: Level, s: &SsdArgs<'_, T>, o: FwdOut<'_, T>) -> Result<()> {
    s.validate()?;
    let (bt, l, h, p, n) = (s.batch, s.len, s.heads, s.hdim, s.dstate);
    let nck = if o.ckpt.is_empty() { 0 } else { n_chunks(l) };
    check_lens(&[
        ("out", o.out.len(), bt * h * l * p),
        ("last_state", o.last.len(), bt * h * p * n),
        ("checkpoints", o.ckpt.len(), bt * h * nck * p * n),
    ])?;
    let tasks = s.tasks();
    let k = tasks.len();
    let shared = TokenMajor {
        ptr: o.out.as_mut_ptr(),
        len: o.out.len(),
    };
    let outs: Vec<OutRows<'_, T>> = if o.token_major {
        (0..k).map(|_| OutRows::Shared(&shared)).collect()
    } else {
        let own = pool::split_lengths(o.out, &vec![l * p; k]);
        own.into_iter().map(OutRows::Own).collect()
    };
    let lasts = pool::split_lengths(o.last, &vec![p * n; k]);
    let ckpts = pool::split_lengths(o.ckpt, &vec![nck * p * n; k]);
    let items: Vec<_> = tasks.into_iter().zip(outs).zip(lasts).zip(ckpts).collect();
    pool::for_each(items, bt * h * l * p * n, |_, (((t, out), last), ckpt)| {
        dispatch(
            level,
            Fwd {
                s,
                t,
                out,
                last,
                ckpt,
            },
        )
    });
    Ok(())
}

// --------------------------------------------------------------------------------------
// Backward
// --------------------------------------------------------------------------------------

/// Gradients. `da`, `dd`, `ddt_bias` are summed over the batch and `db`, `dc` over the
/// heads of each group, in a fixed order.
pub struct BwdOut<'a, T> {
    /// `(batch, heads, len, P)`.
    pub dx: &'a mut [T],
    /// `(batch, heads, len)`.
    pub ddt: &'a mut [T],
    /// `(heads,)`.
    pub da: &'a mut [T],
    /// `(batch, len, groups, N)` each.
    pub db: &'a mut [T],
    pub dc: &'a mut [T],
    /// Like `D`.
    pub dd: Option<&'a mut [T]>,
    /// `(batch, heads, len, P)`.
    pub dz: Option<&'a mut [T]>,
    /// `(heads,)`.
    pub ddt_bias: Option<&'a mut [T]>,
    /// `(batch, heads, P, N)`.
    pub dh0: &'a mut [T],
}

/// Most head blocks per (batch row, group) in the backward: each block sums its heads'
/// shares of dB and dC into one partial, so fewer blocks mean less memory traffic.
const HEAD_BLOCKS: usize = 8;
/// Bytes of recomputed states a backward row block may hold (one chunk of them): small
/// enough to stay in L2.
const ROW_BLOCK_BYTES: usize = 512 * 1024;

/// A backward task: heads `h0..h1` (one group) of batch row `b`.
#[derive(Clone, Copy, Debug)]
struct HeadBlock {
    b: usize,
    h0: usize,
    h1: usize,
}

fn head_blocks(s: &SsdArgs<'_, impl Elem>) -> Vec<HeadBlock> {
    let hpg = s.heads / s.groups;
    let per = hpg.div_ceil(HEAD_BLOCKS.min(hpg));
    let mut out = Vec::new();
    for b in 0..s.batch {
        for grp in 0..s.groups {
            let mut h0 = grp * hpg;
            while h0 < (grp + 1) * hpg {
                let h1 = (h0 + per).min((grp + 1) * hpg);
                out.push(HeadBlock { b, h0, h1 });
                h0 = h1;
            }
        }
    }
    out
}

/// Per-task outputs of the backward; the partial sums are reduced afterwards.
struct TaskOut<'s, T> {
    /// `(heads of the block, len, P)`.
    dx: &'s mut [T],
    /// `(heads of the block, len)`.
    ddt: &'s mut [T],
    dz: &'s mut [T],
    /// `(heads of the block, P, N)`.
    dh0: &'s mut [T],
    /// `(len, N)`: the block's share of dB and dC.
    db: &'s mut [T],
    dc: &'s mut [T],
    /// `(heads of the block, P)`: this batch row's share of dD (per channel).
    dd: &'s mut [T],
    /// `(heads of the block, 2)`: `[dA, ddt_bias]` of this batch row.
    sums: &'s mut [T],
}

struct Bwd<'s, 'a, T> {
    s: &'s SsdArgs<'a, T>,
    blk: HeadBlock,
    /// `(heads of the block, n_chunks, P, N)`.
    ckpt: &'s [T],
    /// `(heads of the block, len, P)`.
    dout: &'s [T],
    /// `(heads of the block, P, N)` or empty.
    dlast: &'s [T],
    o: TaskOut<'s, T>,
}

impl<T: SimdElem> Kernel<T> for Bwd<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Bwd {
            s,
            blk,
            ckpt,
            dout,
            dlast,
            o,
        } = self;
        let (w, n, p, l) = (V::W, s.dstate, s.hdim, s.len);
        let nv = n.div_ceil(w);
        let nck = n_chunks(l);
        // Rows per block: a chunk of their states fits in ROW_BLOCK_BYTES. Fixed by the
        // shapes (and the level's padding), never by the thread count.
        let row_bytes = (CHUNK + 1) * nv * w * core::mem::size_of::<T>();
        let rb = (ROW_BLOCK_BYTES / row_bytes).clamp(1, p);
        let mut tmp = vec![T::ZERO; w];
        let mut sbuf = vec![V::zero(); (CHUNK + 1) * rb * nv];
        let mut g = vec![V::zero(); rb * nv];
        let (mut bv, mut cv) = (vec![V::zero(); nv], vec![V::zero(); nv]);
        let (mut dbv, mut dcv) = (vec![V::zero(); nv], vec![V::zero(); nv]);
        let mut acc = vec![V::zero(); rb];
        let mut sums = vec![T::ZERO; rb];
        let mut dy = vec![T::ZERO; rb];
        // Per step, summed over the head's row blocks: Σ_r x_r (G_r·B) and G·S_prev.
        let (mut xgb, mut gsp) = (vec![T::ZERO; l], vec![T::ZERO; l]);
        o.db.fill(T::ZERO);
        o.dc.fill(T::ZERO);
        o.dd.fill(T::ZERO);
        for (k, hh) in (blk.h0..blk.h1).enumerate() {
            let t = Task { b: blk.b, h: hh };
            let st = steps(s, t, true);
            let a_h = s.a[hh];
            let ckpt = &ckpt[k * nck * p * n..(k + 1) * nck * p * n];
            let dout = &dout[k * l * p..(k + 1) * l * p];
            let dxh = &mut o.dx[k * l * p..(k + 1) * l * p];
            let dzh: &mut [T] = if s.z.is_some() {
                &mut o.dz[k * l * p..(k + 1) * l * p]
            } else {
                &mut []
            };
            let dh0 = &mut o.dh0[k * p * n..(k + 1) * p * n];
            let ddh = &mut o.dd[k * p..(k + 1) * p];
            xgb.fill(T::ZERO);
            gsp.fill(T::ZERO);
            for r0 in (0..p).step_by(rb) {
                let nr = rb.min(p - r0);
                let ps = nr * nv;
                g[..ps].fill(V::zero());
                if !dlast.is_empty() {
                    for r in 0..nr {
                        let src = &dlast[(k * p + r0 + r) * n..];
                        load_row(src, n, &mut g[r * nv..(r + 1) * nv], &mut tmp);
                    }
                }
                for c in (0..nck).rev() {
                    let t0 = c * CHUNK;
                    let tl = CHUNK.min(l - t0);
                    // Slot 0: the checkpoint; slot j + 1: the state after step t0 + j.
                    for r in 0..nr {
                        let src = &ckpt[(c * p + r0 + r) * n..][..n];
                        load_row(src, n, &mut sbuf[r * nv..(r + 1) * nv], &mut tmp);
                    }
                    for j in 0..tl {
                        let tt = t0 + j;
                        let (prev, cur) = sbuf[j * ps..(j + 2) * ps].split_at_mut(ps);
                        let keep = !s.reset(blk.b, tt);
                        let (bo, _) = s.bcrow(blk.b, tt, hh);
                        load_row(&s.b[bo..], n, &mut bv, &mut tmp);
                        let (delta, av) = (st.delta[tt], V::splat(st.decay[tt]));
                        let xs = &s.x[s.xrow(blk.b, tt, hh) + r0..][..nr];
                        for (r, &xr) in xs.iter().enumerate() {
                            let dx = V::splat(delta * xr);
                            let pr = &prev[r * nv..(r + 1) * nv];
                            let cr = &mut cur[r * nv..(r + 1) * nv];
                            if keep {
                                for ((cv_, &pv), &b) in cr.iter_mut().zip(pr).zip(&bv) {
                                    *cv_ = pv.fma(av, dx.mul(b));
                                }
                            } else {
                                for (cv_, &b) in cr.iter_mut().zip(&bv) {
                                    *cv_ = dx.mul(b);
                                }
                            }
                        }
                    }
                    for j in (0..tl).rev() {
                        let tt = t0 + j;
                        let (prev, cur) = sbuf[j * ps..(j + 2) * ps].split_at(ps);
                        let keep = !s.reset(blk.b, tt);
                        let (bo, co) = s.bcrow(blk.b, tt, hh);
                        load_row(&s.b[bo..], n, &mut bv, &mut tmp);
                        load_row(&s.c[co..], n, &mut cv, &mut tmp);
                        let (delta, decay) = (st.delta[tt], st.decay[tt]);
                        let av = V::splat(decay);
                        let xo = s.xrow(blk.b, tt, hh) + r0;
                        let zo = s.zrow(blk.b, tt, hh) + r0;
                        let xs = &s.x[xo..][..nr];
                        let go = &dout[tt * p + r0..][..nr];
                        // The gate: dy = dout·silu(z), dz = dout·y·silu'(z), y recomputed.
                        if let Some(z) = s.z {
                            for r in 0..nr {
                                let mut y = V::zero();
                                for (&h, &c) in cur[r * nv..(r + 1) * nv].iter().zip(&cv) {
                                    y = h.fma(c, y);
                                }
                                acc[r] = y;
                            }
                            sum_vectors(&acc[..nr], &mut sums[..nr]);
                            for r in 0..nr {
                                let zr = z[zo + r];
                                let (sl, sg) = silu(zr);
                                let y = sums[r] + s.d_at(hh, r0 + r) * xs[r];
                                // silu'(z) = σ(z)(1 + z(1 − σ(z)))
                                let dsilu = sg * (T::ONE + zr * (T::ONE - sg));
                                dzh[tt * p + r0 + r] = go[r] * y * dsilu;
                                dy[r] = go[r] * sl;
                            }
                        } else {
                            dy[..nr].copy_from_slice(go);
                        }
                        dbv.fill(V::zero());
                        dcv.fill(V::zero());
                        let mut ga = V::zero();
                        for r in 0..nr {
                            let dyv = V::splat(dy[r]);
                            let dxv = V::splat(delta * xs[r]);
                            let gr = &mut g[r * nv..(r + 1) * nv];
                            let pr = &prev[r * nv..(r + 1) * nv];
                            let cr = &cur[r * nv..(r + 1) * nv];
                            let mut gbr = V::zero();
                            for jj in 0..nv {
                                let gj = dyv.fma(cv[jj], gr[jj]);
                                dcv[jj] = dyv.fma(cr[jj], dcv[jj]);
                                dbv[jj] = dxv.fma(gj, dbv[jj]);
                                gbr = gj.fma(bv[jj], gbr);
                                ga = gj.fma(pr[jj], ga);
                                gr[jj] = if keep { gj.mul(av) } else { V::zero() };
                            }
                            acc[r] = gbr;
                        }
                        sum_vectors(&acc[..nr], &mut sums[..nr]);
                        if keep {
                            gsp[tt] = gsp[tt] + ga.hsum();
                        }
                        let dxo = &mut dxh[tt * p + r0..][..nr];
                        let mut xg = T::ZERO;
                        for r in 0..nr {
                            xg = xg + xs[r] * sums[r];
                            let d = s.d_at(hh, r0 + r);
                            dxo[r] = delta * sums[r] + d * dy[r];
                            ddh[r0 + r] = ddh[r0 + r] + dy[r] * xs[r];
                        }
                        xgb[tt] = xgb[tt] + xg;
                        add_row(&dbv, n, &mut o.db[tt * n..(tt + 1) * n], &mut tmp);
                        add_row(&dcv, n, &mut o.dc[tt * n..(tt + 1) * n], &mut tmp);
                    }
                }
                for r in 0..nr {
                    let dst = &mut dh0[(r0 + r) * n..(r0 + r + 1) * n];
                    store_row(&g[r * nv..(r + 1) * nv], n, dst, &mut tmp);
                }
            }
            // dΔ = Σ_r x_r (G_r·B) + (G·S_prev)·a·A; dA += (G·S_prev)·a·Δ.
            let (mut da, mut dbias) = (T::ZERO, T::ZERO);
            let ddt = &mut o.ddt[k * l..(k + 1) * l];
            for tt in 0..l {
                let (delta, decay) = (st.delta[tt], st.decay[tt]);
                let ddelta = xgb[tt] + gsp[tt] * decay * a_h;
                da = da + gsp[tt] * decay * delta;
                let d = ddelta * st.gate[tt];
                ddt[tt] = d;
                dbias = dbias + d;
            }
            o.sums[2 * k] = da;
            o.sums[2 * k + 1] = dbias;
        }
    }
}

/// `dst[..n] += src` (the first `n` lanes).
#[inline(always)]
fn add_row<V: Vector>(src: &[V], n: usize, dst: &mut [V::E], tmp: &mut [V::E]) {
    let w = V::W;
    for (j, v) in src.iter().enumerate() {
        let lo = j * w;
        if lo + w <= n {
            v.add(V::load(&dst[lo..])).store(&mut dst[lo..]);
        } else {
            v.store(tmp);
            for (d, &x) in dst[lo..n].iter_mut().zip(tmp.iter()) {
                *d = *d + x;
            }
        }
    }
}

/// Backward from the forward's checkpoints: `dout (batch, heads, len, P)`, `dlast
/// (batch, heads, P, N)` (optional).
pub fn backward<T: SimdElem>(
    level: Level,
    s: &SsdArgs<'_, T>,
    ckpt: &[T],
    dout: &[T],
    dlast: Option<&[T]>,
    mut o: BwdOut<'_, T>,
) -> Result<()> {
    s.validate()?;
    let (bt, l, h, p, g, n) = (s.batch, s.len, s.heads, s.hdim, s.groups, s.dstate);
    let dsz = s.d.map_or(0, <[T]>::len);
    let nck = n_chunks(l);
    check_lens(&[
        ("checkpoints", ckpt.len(), bt * h * nck * p * n),
        ("dout", dout.len(), bt * h * l * p),
        (
            "dlast_state",
            dlast.map_or(bt * h * p * n, <[T]>::len),
            bt * h * p * n,
        ),
        ("dx", o.dx.len(), bt * h * l * p),
        ("ddt", o.ddt.len(), bt * h * l),
        ("dA", o.da.len(), h),
        ("dB", o.db.len(), bt * l * g * n),
        ("dC", o.dc.len(), bt * l * g * n),
        ("dD", o.dd.as_ref().map_or(dsz, |x| x.len()), dsz),
        (
            "dz",
            o.dz.as_ref().map_or(bt * h * l * p, |x| x.len()),
            bt * h * l * p,
        ),
        ("ddt_bias", o.ddt_bias.as_ref().map_or(h, |x| x.len()), h),
        ("dinitial_states", o.dh0.len(), bt * h * p * n),
    ])?;
    if o.dz.is_some() != s.z.is_some() {
        return Err(Error::invalid("dz", "given exactly when z is"));
    }
    let blocks = head_blocks(s);
    let nb = blocks.len();
    let hs: Vec<usize> = blocks.iter().map(|x| x.h1 - x.h0).collect();
    let lens = |k: usize| hs.iter().map(|x| x * k).collect::<Vec<_>>();
    let mut pdb = vec![T::ZERO; nb * l * n];
    let mut pdc = vec![T::ZERO; nb * l * n];
    let mut pdd = vec![T::ZERO; bt * h * p];
    let mut psums = vec![T::ZERO; bt * h * 2];
    let mut nodz = Vec::new();
    let (dz_all, dzl): (&mut [T], usize) = match o.dz {
        Some(x) => (x, l * p),
        None => (&mut nodz, 0),
    };
    let items: Vec<_> = blocks
        .iter()
        .copied()
        .zip(pool::split_lengths(o.dx, &lens(l * p)))
        .zip(pool::split_lengths(o.ddt, &lens(l)))
        .zip(pool::split_lengths(dz_all, &lens(dzl)))
        .zip(pool::split_lengths(o.dh0, &lens(p * n)))
        .zip(pool::split_lengths(&mut pdb, &vec![l * n; nb]))
        .zip(pool::split_lengths(&mut pdc, &vec![l * n; nb]))
        .zip(pool::split_lengths(&mut pdd, &lens(p)))
        .zip(pool::split_lengths(&mut psums, &lens(2)))
        .map(|((((((((blk, dx), ddt), dz), dh0), db), dc), dd), sums)| {
            let o = TaskOut {
                dx,
                ddt,
                dz,
                dh0,
                db,
                dc,
                dd,
                sums,
            };
            (blk, o)
        })
        .collect();
    pool::for_each(items, 3 * bt * h * l * p * n, |_, (blk, to)| {
        // Heads of one batch row are consecutive in every head-major array.
        let (first, last) = (blk.b * h + blk.h0, blk.b * h + blk.h1);
        let dl = dlast.map_or(&[][..], |x| &x[first * p * n..last * p * n]);
        dispatch(
            level,
            Bwd {
                s,
                blk,
                ckpt: &ckpt[first * nck * p * n..last * nck * p * n],
                dout: &dout[first * l * p..last * l * p],
                dlast: dl,
                o: to,
            },
        )
    });
    // dB, dC: the blocks of each (batch row, group) in head order.
    let rows: Vec<(usize, &mut [T], &mut [T])> = pool::split_lengths(o.db, &vec![l * g * n; bt])
        .into_iter()
        .zip(pool::split_lengths(o.dc, &vec![l * g * n; bt]))
        .enumerate()
        .map(|(b, (db, dc))| (b, db, dc))
        .collect();
    let (pdb, pdc, blocks) = (&pdb, &pdc, &blocks);
    pool::for_each(rows, 2 * nb * l * n, |_, (b, db, dc)| {
        for (dst, part) in [(db, pdb), (dc, pdc)] {
            dst.fill(T::ZERO);
            for (i, blk) in blocks.iter().enumerate().filter(|(_, x)| x.b == b) {
                let grp = blk.h0 / (h / g);
                let src = &part[i * l * n..][..l * n];
                for tt in 0..l {
                    let d = &mut dst[(tt * g + grp) * n..][..n];
                    for (x, &y) in d.iter_mut().zip(&src[tt * n..(tt + 1) * n]) {
                        *x = *x + y;
                    }
                }
            }
        }
    });
    for hh in 0..h {
        let (mut da, mut dbias) = (T::ZERO, T::ZERO);
        for b in 0..bt {
            da = da + psums[(b * h + hh) * 2];
            dbias = dbias + psums[(b * h + hh) * 2 + 1];
        }
        o.da[hh] = da;
        if let Some(x) = o.ddt_bias.as_deref_mut() {
            x[hh] = dbias;
        }
    }
    if let Some(dd) = o.dd {
        dd.fill(T::ZERO);
        let per_head = dd.len() == h;
        for b in 0..bt {
            for hh in 0..h {
                for r in 0..p {
                    let v = pdd[(b * h + hh) * p + r];
                    let i = if per_head { hh } else { hh * p + r };
                    dd[i] = dd[i] + v;
                }
            }
        }
    }
    Ok(())
}

// --------------------------------------------------------------------------------------
// One decoding step
// --------------------------------------------------------------------------------------

/// Inputs of one SSD decoding step (Mamba-2's `selective_state_update` with one decay per
/// head): `x`, `z` `(batch, heads, P)`; `dt` `(batch, heads)`; `A`, `dt_bias` `(heads,)`;
/// `B`, `C` `(batch, groups, N)`; `D` `(heads,)` or `(heads, P)`.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs<'a, T> {
    pub batch: usize,
    pub heads: usize,
    pub hdim: usize,
    pub groups: usize,
    pub dstate: usize,
    pub x: &'a [T],
    pub dt: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub dt_bias: Option<&'a [T]>,
    pub softplus: bool,
}

impl<T: SimdElem> StepArgs<'_, T> {
    /// The same scan arguments for a length-1 sequence (the layouts coincide at L = 1).
    fn as_scan(&self) -> SsdArgs<'_, T> {
        SsdArgs {
            batch: self.batch,
            len: 1,
            heads: self.heads,
            hdim: self.hdim,
            groups: self.groups,
            dstate: self.dstate,
            x: self.x,
            dt: self.dt,
            a: self.a,
            b: self.b,
            c: self.c,
            d: self.d,
            z: self.z,
            dt_bias: self.dt_bias,
            h0: None,
            seq_idx: None,
            softplus: self.softplus,
            limit: None,
            rows: RowStrides::natural(self.heads, self.hdim, self.groups, self.dstate),
        }
    }
}

struct StepTask<'s, 'a, T> {
    s: &'s SsdArgs<'a, T>,
    t: Task,
    /// `(P, N)`, updated in place.
    state: &'s mut [T],
    /// `(P,)`.
    out: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for StepTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let StepTask { s, t, state, out } = self;
        let (w, n, p) = (V::W, s.dstate, s.hdim);
        let nv = n.div_ceil(w);
        let mut tmp = vec![T::ZERO; w];
        let st = steps(s, t, false);
        let (delta, av) = (st.delta[0], V::splat(st.decay[0]));
        let (mut bv, mut cv, mut row) = (
            vec![V::zero(); nv],
            vec![V::zero(); nv],
            vec![V::zero(); nv],
        );
        let (bo, co) = s.bcrow(t.b, 0, t.h);
        load_row(&s.b[bo..], n, &mut bv, &mut tmp);
        load_row(&s.c[co..], n, &mut cv, &mut tmp);
        let xo = s.xrow(t.b, 0, t.h);
        let mut acc = vec![V::zero(); p];
        let mut ys = vec![T::ZERO; p];
        for (r, &xr) in s.x[xo..][..p].iter().enumerate() {
            let dx = V::splat(delta * xr);
            let srow = &mut state[r * n..(r + 1) * n];
            load_row(srow, n, &mut row, &mut tmp);
            let mut y = V::zero();
            for ((sv, &b), &c) in row.iter_mut().zip(&bv).zip(&cv) {
                let h = sv.fma(av, dx.mul(b));
                *sv = h;
                y = h.fma(c, y);
            }
            store_row(&row, n, srow, &mut tmp);
            acc[r] = y;
        }
        sum_vectors(&acc, &mut ys);
        for (r, (o, &y)) in out.iter_mut().zip(&ys).enumerate() {
            let mut v = y + s.d_at(t.h, r) * s.x[xo + r];
            if let Some(z) = s.z {
                v = v * silu(z[s.zrow(t.b, 0, t.h) + r]).0;
            }
            *o = v;
        }
    }
}

/// One decoding step: updates `state (batch, heads, P, N)` in place and writes `out
/// (batch, heads, P)`. Everything is validated before anything is written.
pub fn state_update<T: SimdElem>(
    level: Level,
    s: &StepArgs<'_, T>,
    state: &mut [T],
    out: &mut [T],
) -> Result<()> {
    let a = s.as_scan();
    a.validate()?;
    let (bt, h, p, n) = (s.batch, s.heads, s.hdim, s.dstate);
    check_lens(&[
        ("state", state.len(), bt * h * p * n),
        ("out", out.len(), bt * h * p),
    ])?;
    let tasks = a.tasks();
    let k = tasks.len();
    let items: Vec<_> = tasks
        .into_iter()
        .zip(pool::split_lengths(state, &vec![p * n; k]))
        .zip(pool::split_lengths(out, &vec![p; k]))
        .collect();
    // A step streams the state through memory once: a second thread only pays for itself
    // on several megabytes of state (measured: none at 0.8 MB, and it contends with
    // torch's OpenMP workers between the model's matmuls).
    pool::for_each(items, bt * h * p * n / 8, |_, ((t, state), out)| {
        dispatch(
            level,
            StepTask {
                s: &a,
                t,
                state,
                out,
            },
        )
    });
    Ok(())
}
