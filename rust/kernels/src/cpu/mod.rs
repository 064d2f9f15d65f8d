//! The CPU machinery every kernel is written against.
//!
//! * [`vector`]: the vocabulary ([`Elem`], [`Vector`]) and the semantics every level
//!   shares;
//! * [`math`]: vectorised `exp`/`softplus`/`sigmoid`, transposes and lane sums, written
//!   once for any [`Vector`];
//! * [`lanes`]: portable lanes (the scalar level, and the SSE2/NEON baseline);
//! * [`x86`]: AVX2+FMA and AVX-512F vectors;
//! * [`dispatch`]: run-time choice of the level (AVX-512 / AVX2+FMA / baseline / scalar);
//! * [`pool`]: the kernels' own thread pool (explicit size, fork-safe);
//! * [`team`]: threads meeting at barriers, and the buffers they share.

pub mod dispatch;
pub mod lanes;
pub mod math;
pub mod pool;
pub mod team;
pub mod vector;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use dispatch::{dispatch, Kernel, Level, SimdElem};
pub use math::{exp, sigmoid, softplus, softplus_grad, sum_rows, sum_vectors, transpose};
pub use vector::{Elem, Vector};
