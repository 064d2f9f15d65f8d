//! Python binding of the CUDA runtime shim (bmojo-cuda): placeholder.

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
