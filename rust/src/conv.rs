//! Python binding: Nilpotent shift state: causal depthwise convolution and its ring-buffer update, SPEC §3.

#![allow(unused_imports)]

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
