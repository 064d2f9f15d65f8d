//! `bmojo_core._core.cuda`: the CUDA runtime shim (bmojo-cuda).
//!
//! Low-level and private: `bmojo_core.cuda` finds the libraries, caches CUBINs and adds
//! context to the errors raised here, which come in the package's classes already
//! (`BmojoCudaError` from the driver or a missing library, `BmojoCompileError` from NVRTC,
//! `BmojoValueError` / `BmojoTypeError` for bad launch arguments; see `errors.rs`).
//! Modules and kernel functions are referred to by index into the shim's tables, so no
//! forged handle ever reaches the driver.

use bmojo_cuda::args::{parse_fmt, Code, Params, Value};
use bmojo_cuda::{driver, nvrtc};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt};

use crate::errors::{PyBmojoErr, Result};

/// The embedded sources of `cuda/`, as `(file name, text)`.
#[pyfunction]
fn sources() -> Vec<(&'static str, &'static str)> {
    bmojo_cuda::sources().to_vec()
}

/// `(nvrtc_loaded, driver_loaded)`: whether this process has bound the libraries.
#[pyfunction]
fn loaded() -> (bool, bool) {
    (nvrtc::is_loaded(), driver::is_loaded())
}

/// Loads NVRTC from `path` (or by name when `None`): `(major, minor, loaded_from)`.
#[pyfunction]
#[pyo3(signature = (path))]
fn nvrtc_version(path: Option<&str>) -> Result<(i32, i32, String)> {
    let lib = nvrtc::get(path)?;
    let (major, minor) = lib.version();
    Ok((major, minor, lib.path().to_string()))
}

/// Compiles `source` to CUBIN. Raises `BmojoCompileError` (with NVRTC's log) when NVRTC
/// produces none, `BmojoCudaError` when the library cannot be loaded.
#[pyfunction]
#[pyo3(signature = (path, source, name, headers, options))]
fn nvrtc_compile<'py>(
    py: Python<'py>,
    path: Option<&str>,
    source: &str,
    name: &str,
    headers: Vec<(String, String)>,
    options: Vec<String>,
) -> Result<Bound<'py, PyBytes>> {
    let lib = nvrtc::get(path)?;
    let hs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let os: Vec<&str> = options.iter().map(String::as_str).collect();
    let cubin = py.detach(|| lib.compile(source, name, &hs, &os))?;
    Ok(PyBytes::new(py, &cubin))
}

/// Loads and initialises the driver (from `path`, default `libcuda.so.1`); returns its
/// CUDA version (`1000 * major + 10 * minor`).
#[pyfunction]
#[pyo3(signature = (path))]
fn driver_version(path: Option<&str>) -> Result<i32> {
    Ok(driver::get(path)?.version())
}

fn drv() -> Result<&'static driver::Driver> {
    Ok(driver::get(None)?)
}

/// Number of visible CUDA devices.
#[pyfunction]
fn device_count() -> Result<i32> {
    Ok(drv()?.device_count()?)
}

/// `(name, cc_major, cc_minor, max_shared_optin_bytes, multiprocessors)` of a device.
#[pyfunction]
#[pyo3(signature = (ordinal))]
fn device(ordinal: i32) -> Result<(String, i32, i32, i32, i32)> {
    let d = drv()?.device(ordinal)?;
    Ok((
        d.name,
        d.capability.0,
        d.capability.1,
        d.max_shared_optin,
        d.multiprocessors,
    ))
}

/// Loads a CUBIN into the primary context of device `ordinal`; returns the module id.
#[pyfunction]
#[pyo3(signature = (ordinal, image))]
fn module_load(py: Python<'_>, ordinal: i32, image: &[u8]) -> Result<usize> {
    let d = drv()?;
    Ok(py.detach(|| d.load_module(ordinal, image))?)
}

/// Looks up the kernel `name` of a loaded module; returns the function id.
#[pyfunction]
#[pyo3(signature = (module, name))]
fn module_function(module: usize, name: &str) -> Result<usize> {
    Ok(drv()?.function(module, name)?)
}

/// Reads launch arguments according to `fmt` and packs them (kinds and ranges checked).
/// `p` takes an int, `None` (a null pointer) or an object with `data_ptr()` (a tensor).
fn pack(fmt: &str, args: &[Bound<'_, PyAny>]) -> Result<Params> {
    let codes = parse_fmt(fmt, args.len())?;
    let mut vals = Vec::with_capacity(args.len());
    for (i, (c, a)) in codes.iter().zip(args).enumerate() {
        let wrong = |what: &str| {
            PyBmojoErr::type_(format!(
                "argument {i} (fmt {:?}): expected {what}, got {}",
                c.as_char(),
                a.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            ))
        };
        let range = |what: &str| {
            PyBmojoErr::value(format!(
                "argument {i} (fmt {:?}): {} is outside the {what} range",
                c.as_char(),
                a.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
            ))
        };
        vals.push(match c {
            Code::Ptr => {
                if a.is_none() {
                    Value::Ptr(0)
                } else if a.is_instance_of::<PyInt>() {
                    Value::Ptr(a.extract::<u64>().map_err(|_| range("pointer (uint64)"))?)
                } else {
                    let p = a
                        .call_method0(intern!(a.py(), "data_ptr"))
                        .map_err(|_| wrong("a tensor, an int address or None"))?;
                    Value::Ptr(p.extract::<u64>().map_err(|_| range("pointer (uint64)"))?)
                }
            }
            Code::I32 | Code::I64 => {
                if !a.is_instance_of::<PyInt>() {
                    return Err(wrong("an int"));
                }
                Value::Int(a.extract::<i64>().map_err(|_| range("int64"))?)
            }
            Code::F32 | Code::F64 => {
                Value::Float(a.extract::<f64>().map_err(|_| wrong("a float"))?)
            }
        });
    }
    Ok(Params::pack(&codes, &vals)?)
}

/// Checks launch arguments against `fmt` without launching (the runtime does this before
/// a kernel's first compilation, so a wrong call fails fast and without a GPU).
#[pyfunction]
#[pyo3(signature = (fmt, args))]
fn check_args(fmt: &str, args: Vec<Bound<'_, PyAny>>) -> Result<()> {
    pack(fmt, &args).map(|_| ())
}

/// Launches function `func` on the raw CUDA stream `stream` (torch's current stream).
#[pyfunction]
#[pyo3(signature = (func, grid, block, shared_mem, stream, fmt, args))]
#[allow(clippy::too_many_arguments)]
fn launch(
    py: Python<'_>,
    func: usize,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem: u32,
    stream: usize,
    fmt: &str,
    args: Vec<Bound<'_, PyAny>>,
) -> Result<()> {
    let mut params = pack(fmt, &args)?;
    if [grid.0, grid.1, grid.2, block.0, block.1, block.2].contains(&0) {
        return Err(PyBmojoErr::value(format!(
            "grid {grid:?} and block {block:?} must be positive in every dimension"
        )));
    }
    let d = drv()?;
    d.check_params(func, &params)?;
    let (grid, block) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
    let r = py.detach(|| d.launch(func, grid, block, shared_mem, stream, &mut params));
    Ok(r?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sources, m)?)?;
    m.add_function(wrap_pyfunction!(loaded, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_compile, m)?)?;
    m.add_function(wrap_pyfunction!(driver_version, m)?)?;
    m.add_function(wrap_pyfunction!(device_count, m)?)?;
    m.add_function(wrap_pyfunction!(device, m)?)?;
    m.add_function(wrap_pyfunction!(module_load, m)?)?;
    m.add_function(wrap_pyfunction!(module_function, m)?)?;
    m.add_function(wrap_pyfunction!(check_args, m)?)?;
    m.add_function(wrap_pyfunction!(launch, m)?)?;
    Ok(())
}
