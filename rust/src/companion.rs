//! Python binding: Companion (canonical) recurrence, SPEC §4.

#![allow(unused_imports)]

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
