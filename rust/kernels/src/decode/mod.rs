//! Fused streaming decode step of a B'MOJO language model (design §6.4): one call consumes
//! one token for every row of the batch through the whole model (embedding, blocks of
//! LN → B'MOJO layer → residual, LN → MLP → residual, final LN, tied head) and updates the
//! stream state in place. It computes exactly what `Stream._run` does for one token
//! (`BMojoLayer._step1`), in fewer, larger pieces.
//!
//! **Bandwidth.** Decode at small batch is bound by reading the weights (19 MB for the
//! 4-layer d=256 model), so every weight matrix is read once per token for the whole batch
//! (GEMV batched over rows) and the rows of each matrix are split over the threads.
//!
//! **Team protocol.** The pool's per-region cost (waking threads, joining) is several µs,
//! and a token needs ~25 dependent steps, so a token runs as *one* team region
//! ([`crate::cpu::team`]): `nt` threads run the same program and meet at a spin barrier
//! between phases. In every phase the work is cut into fixed tasks (blocks of [`ROWS`]
//! weight rows, blocks of channels, batch rows) whose results do not depend on which
//! thread runs them, so the output is bitwise independent of the thread count. Buffers
//! shared by the team are `TeamBuf`s, used by the protocol of [`crate::cpu::team`]: within
//! one phase (between two barriers) a buffer is either only read, or written in parts
//! that belong to exactly one thread (and read by that thread only); the barrier's
//! acquire/release orders the phases. Tiny sequential pieces (embedding, LayerNorms,
//! residual adds) are computed redundantly by every thread into private buffers, which
//! saves barriers.
//!
//! Files: `math.rs` (GELU, LayerNorm, dot), `gemv.rs` (the batched GEMV and its task
//! split), `model.rs` (the parameters and their checks), `state.rs` (the stream state,
//! its sizes and checks), `step.rs` (the step and the team program), `blocks.rs` (the
//! per-task pieces: conv, SSM update, attention, memory), `tests.rs` (unit tests of the
//! pieces).

/// `map_buf!(V, buf, |v| expr)`: replaces every element of `buf` by `expr`, a vector at a
/// time (the tail padded). A macro rather than a function taking a closure: a closure (or
/// a fn item called through `Fn`) is compiled without the level's target features, which
/// leaves the intrinsics as out-of-line calls (see `dispatch`).
macro_rules! map_buf {
    ($V:ty, $buf:expr, |$v:ident| $body:expr) => {{
        let buf = $buf;
        let w = <$V as $crate::cpu::Vector>::W;
        let mut chunks = buf.chunks_exact_mut(w);
        for c in &mut chunks {
            let $v = <$V as $crate::cpu::Vector>::load(c);
            ($body).store(c);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            let mut tmp = [<<$V as $crate::cpu::Vector>::E as $crate::cpu::Elem>::ZERO; 16];
            tmp[..n].copy_from_slice(rest);
            let $v = <$V as $crate::cpu::Vector>::load(&tmp);
            ($body).store(&mut tmp);
            rest.copy_from_slice(&tmp[..n]);
        }
    }};
}

mod blocks;
mod gemv;
mod math;
mod model;
mod state;
mod step;
#[cfg(test)]
mod tests;

pub use gemv::ROWS;
pub use math::{erf, DecodeElem};
pub use model::{Attn, Layer, Linear, Model, Norm, Ssm};
pub use state::{LayerState, State};
pub use step::decode_step;
