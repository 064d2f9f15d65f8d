//! The one place where errors become Python exceptions.
//!
//! Bindings return [`Result`]; everything that can go wrong converts into [`PyBmojoErr`]
//! (as polars' `PyPolarsErr` does), which becomes a `PyErr` of a class of the Python
//! module `bmojo_core.errors`:
//!
//! | error | raised as |
//! | --- | --- |
//! | a kernel's [`bmojo_kernels::Error`] (sizes, values, corrupted state) | `BmojoValueError` |
//! | a binding's own bad argument value or shape ([`PyBmojoErr::Value`]) | `BmojoValueError` |
//! | a binding's own wrong type, dtype or layout ([`PyBmojoErr::Type`]) | `BmojoTypeError` |
//! | `bmojo_cuda::Error::Unavailable` / `Driver` (no library, driver failure) | `BmojoCudaError` |
//! | `bmojo_cuda::Error::Compile` (NVRTC's log) | `BmojoCompileError` |
//! | `bmojo_cuda::Error::Argument` (bad launch arguments) | `BmojoValueError` |
//! | an exception raised by Python itself ([`PyBmojoErr::Python`]) | unchanged |
//!
//! The classes subclass `ValueError`, `TypeError` and `RuntimeError`, so callers that
//! catch those keep working. They are imported from `bmojo_core.errors` on first use and
//! kept; should that module not be importable (the extension loaded on its own), the
//! built-in base classes are raised instead, with the same message.

use numpy::AsSliceError;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// An error on its way to Python.
#[derive(Debug)]
pub(crate) enum PyBmojoErr {
    /// A kernel refused its arguments.
    Kernel(bmojo_kernels::Error),
    /// The CUDA shim failed.
    Cuda(bmojo_cuda::Error),
    /// A binding's own check of an argument's value or shape.
    Value(String),
    /// A binding's own check of an argument's type, dtype or memory layout.
    Type(String),
    /// An exception Python raised (a failed conversion, a missing dict key, ...).
    Python(PyErr),
}

/// Result of a binding.
pub(crate) type Result<T, E = PyBmojoErr> = std::result::Result<T, E>;

impl PyBmojoErr {
    /// A bad argument value or shape.
    pub(crate) fn value(msg: impl Into<String>) -> Self {
        PyBmojoErr::Value(msg.into())
    }

    /// A bad argument type, dtype or layout.
    pub(crate) fn type_(msg: impl Into<String>) -> Self {
        PyBmojoErr::Type(msg.into())
    }
}

impl From<bmojo_kernels::Error> for PyBmojoErr {
    fn from(e: bmojo_kernels::Error) -> Self {
        PyBmojoErr::Kernel(e)
    }
}

impl From<bmojo_cuda::Error> for PyBmojoErr {
    fn from(e: bmojo_cuda::Error) -> Self {
        PyBmojoErr::Cuda(e)
    }
}

impl From<bmojo_cuda::nvrtc::CompileError> for PyBmojoErr {
    fn from(e: bmojo_cuda::nvrtc::CompileError) -> Self {
        PyBmojoErr::Cuda(e.into())
    }
}

impl From<PyErr> for PyBmojoErr {
    fn from(e: PyErr) -> Self {
        PyBmojoErr::Python(e)
    }
}

impl From<AsSliceError> for PyBmojoErr {
    fn from(e: AsSliceError) -> Self {
        PyBmojoErr::Type(e.to_string())
    }
}

/// The classes of `bmojo_core.errors`.
#[derive(Clone, Copy)]
enum Class {
    Value,
    Type,
    Cuda,
    Compile,
}

static VALUE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CUDA: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static COMPILE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// An instance of `class` carrying `msg`.
fn raise(class: Class, msg: String) -> PyErr {
    Python::attach(|py| {
        let (cell, name) = match class {
            Class::Value => (&VALUE, "BmojoValueError"),
            Class::Type => (&TYPE, "BmojoTypeError"),
            Class::Cuda => (&CUDA, "BmojoCudaError"),
            Class::Compile => (&COMPILE, "BmojoCompileError"),
        };
        match cell.import(py, "bmojo_core.errors", name) {
            Ok(ty) => PyErr::from_type(ty.clone(), msg),
            Err(_) => match class {
                Class::Value => PyValueError::new_err(msg),
                Class::Type => PyTypeError::new_err(msg),
                Class::Cuda | Class::Compile => PyRuntimeError::new_err(msg),
            },
        }
    })
}

impl From<PyBmojoErr> for PyErr {
    fn from(e: PyBmojoErr) -> PyErr {
        use bmojo_cuda::Error as Cuda;
        match e {
            PyBmojoErr::Kernel(e) => raise(Class::Value, e.to_string()),
            PyBmojoErr::Value(m) => raise(Class::Value, m),
            PyBmojoErr::Type(m) => raise(Class::Type, m),
            PyBmojoErr::Cuda(e @ (Cuda::Unavailable(_) | Cuda::Driver { .. })) => {
                raise(Class::Cuda, e.to_string())
            }
            PyBmojoErr::Cuda(e @ Cuda::Compile(_)) => raise(Class::Compile, e.to_string()),
            PyBmojoErr::Cuda(e @ Cuda::Argument(_)) => raise(Class::Value, e.to_string()),
            PyBmojoErr::Python(e) => e,
        }
    }
}
