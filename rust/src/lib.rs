//! `bmojo_core._core`: the Python binding of the kernel crate and the CUDA shim.
//!
//! One submodule per Python op module: `_core.runtime`, `_core.scan`, `_core.ssd`, `_core.step`,
//! `_core.conv`, `_core.companion`, `_core.bilinear`, `_core.eidetic`, `_core.decode`,
//! `_core.cuda` (each also importable as `bmojo_core._core.<name>`). Functions take NumPy
//! arrays (zero-copy views of torch CPU tensors made by the Python layer, which also
//! validates shapes and dtypes and allocates the outputs); everything is checked again
//! against the kernels' expectations ([`args`]), and every error becomes an exception of
//! `bmojo_core.errors` in one place ([`errors`]). The GIL is released while a kernel runs.

mod args;
mod errors;

mod bilinear;
mod companion;
mod conv;
mod cuda;
mod decode;
mod eidetic;
mod runtime;
mod scan;
mod ssd;
mod step;

use pyo3::prelude::*;

/// The extension's full name (maturin's `module-name`).
const NAME: &str = "bmojo_core._core";

/// Adds the submodule `name` (filled by `register`) to `parent`, named
/// `bmojo_core._core.<name>` and entered in `sys.modules`, so that both
/// `from bmojo_core._core import name` and `import bmojo_core._core.name` work.
fn submodule(
    parent: &Bound<'_, PyModule>,
    name: &str,
    register: fn(&Bound<'_, PyModule>) -> PyResult<()>,
) -> PyResult<()> {
    let py = parent.py();
    let full = format!("{NAME}.{name}");
    let m = PyModule::new(py, &full)?;
    register(&m)?;
    parent.add_submodule(&m)?;
    py.import("sys")?.getattr("modules")?.set_item(&full, &m)?;
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    submodule(m, "runtime", runtime::register)?;
    submodule(m, "scan", scan::register)?;
    submodule(m, "ssd", ssd::register)?;
    submodule(m, "step", step::register)?;
    submodule(m, "conv", conv::register)?;
    submodule(m, "companion", companion::register)?;
    submodule(m, "bilinear", bilinear::register)?;
    submodule(m, "eidetic", eidetic::register)?;
    submodule(m, "decode", decode::register)?;
    submodule(m, "cuda", cuda::register)?;
    Ok(())
}
