//! CPU kernels of bmojo_core, free of any Python dependency.
//!
//! * [`cpu`]: the machinery: SIMD vocabulary and vector math, run-time choice of
//!   AVX-512 / AVX2+FMA / baseline (SSE2 or NEON) / scalar, the thread pool and teams;
//! * [`diag`], [`selective`], [`step`]: the diagonal scans; [`ssd`]: Mamba-2's multi-head
//!   SSD scan;
//! * [`companion`], [`conv`], [`bilinear`]: canonical, nilpotent and bilinear realizations;
//! * [`eidetic`]: innovation scores and the bounded eidetic store;
//! * [`decode`]: the fused streaming decode step of a B'MOJO language model;
//! * [`error`]: the typed [`Error`] every kernel returns.
//!
//! The scalar oracles the tests compare against live with the tests (`tests/common/`).

pub mod bilinear;
pub mod companion;
pub mod conv;
pub mod cpu;
pub mod decode;
pub mod diag;
pub mod eidetic;
pub mod error;
pub mod selective;
mod slots;
pub mod ssd;
pub mod step;

pub use cpu::{Level, SimdElem};
pub use error::{Error, Result};
