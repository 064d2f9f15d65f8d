//! CPU kernels of bmojo_core, free of any Python dependency.
//!
//! * [`simd`]: the vector vocabulary and vectorised `exp`/`softplus`/`sigmoid`;
//! * [`dispatch`]: run-time choice of AVX-512 / AVX2+FMA / baseline (SSE2 or NEON) /
//!   scalar;
//! * [`pool`]: the kernels' own thread pool (explicit size, fork-safe);
//! * [`diag`], [`selective`], [`step`]: the diagonal scans;
//! * [`companion`], [`conv`], [`bilinear`]: canonical, nilpotent and bilinear realizations;
//! * [`eidetic`]: innovation scores and the bounded eidetic store;
//! * [`error`]: the typed [`Error`] every kernel returns;
//! * [`reference`]: plain scalar implementations used by the tests as oracles.

pub mod bilinear;
pub mod companion;
pub mod conv;
pub mod decode;
pub mod diag;
pub mod dispatch;
pub mod eidetic;
pub mod error;
pub mod pool;
pub mod reference;
pub mod selective;
pub mod simd;
mod slots;
pub mod step;

pub use dispatch::{Level, SimdElem};
pub use error::{Error, Result};
