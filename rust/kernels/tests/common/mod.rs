//! Helpers shared by the kernel test crates (each uses a subset, hence the allow): the
//! generator and tolerance check of [`util`], and the scalar oracles of [`reference`].
#![allow(dead_code, unused_imports)]

pub mod reference;
mod util;

pub use util::{close, to32, to64, Rng};
