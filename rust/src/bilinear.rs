//! Python binding: Bilinear / time-varying dense affine recurrence, SPEC §5.

#![allow(unused_imports)]

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
