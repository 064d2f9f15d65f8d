//! `bmojo_core._core.runtime`: the kernels' SIMD level and thread count.

use std::sync::atomic::{AtomicU8, Ordering};

use bmojo_kernels::cpu::pool;
use bmojo_kernels::Level;
use pyo3::prelude::*;

use crate::errors::{PyBmojoErr, Result};

/// Current level as its index in `Level::ALL` (u8::MAX: not chosen yet = best).
static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);

/// The level every binding runs its kernel at.
pub(crate) fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        u8::MAX => Level::best(),
        i => Level::ALL[i as usize],
    }
}

/// Name of the instruction-set level the kernels use now.
#[pyfunction]
fn simd_level() -> &'static str {
    level().name()
}

/// Levels this CPU supports, best first.
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    Level::supported().into_iter().map(Level::name).collect()
}

/// Forces a level (one of `simd_levels()`).
#[pyfunction]
fn set_simd_level(name: &str) -> Result<()> {
    let Some(l) = Level::from_name(name).filter(|l| l.is_supported()) else {
        return Err(PyBmojoErr::value(format!(
            "simd level: expected one of {:?} (supported on this CPU), got {name:?}",
            simd_levels()
        )));
    };
    let i = Level::ALL.iter().position(|&x| x == l).unwrap_or(0);
    LEVEL.store(i as u8, Ordering::Relaxed);
    Ok(())
}

/// Threads the kernels may use.
#[pyfunction]
fn get_num_threads() -> usize {
    pool::num_threads()
}

/// Sets the kernels' thread count (1 ..= `MAX_THREADS`).
#[pyfunction]
fn set_num_threads(n: i64) -> Result<()> {
    match usize::try_from(n) {
        Ok(n) => Ok(pool::set_num_threads(n)?),
        Err(_) => Err(PyBmojoErr::value(format!(
            "num_threads: expected an integer in [1, {}], got {n}",
            pool::MAX_THREADS
        ))),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add("MAX_THREADS", pool::MAX_THREADS)?;
    Ok(())
}
