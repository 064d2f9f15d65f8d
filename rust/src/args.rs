//! Array and argument helpers shared by the bindings.
//!
//! Arrays arrive as NumPy arrays (zero-copy views of torch CPU tensors made by the Python
//! layer). A binding takes typed views of them here: C-contiguous, of the expected dtype,
//! and (for outputs) writable and not aliased, so that a wrong call raises instead of
//! reading or writing the wrong memory. Shapes are checked against what the kernel will
//! read with the one [`want`].

use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::{PyBmojoErr, Result};

/// `by_float!(is_f64(..)?, go(args))`: calls the binding's generic `go::<f64>` or
/// `go::<f32>` with the same arguments (the one place the float dtype is dispatched).
macro_rules! by_float {
    ($f64:expr, $go:ident($($a:expr),* $(,)?)) => {
        if $f64 {
            $go::<f64>($($a),*)
        } else {
            $go::<f32>($($a),*)
        }
    };
}
pub(crate) use by_float;

/// An optional array argument.
pub(crate) type Opt<'a, 'py> = &'a Option<Bound<'py, PyAny>>;

fn layout_err<T>(name: &str) -> PyBmojoErr {
    let what = std::any::type_name::<T>();
    PyBmojoErr::type_(format!("{name}: expected a C-contiguous {what} array"))
}

/// `a` as a C-contiguous array of `T`.
fn typed<'a, 'py, T: Element>(
    a: &'a Bound<'py, PyAny>,
    name: &str,
) -> Result<&'a Bound<'py, PyArrayDyn<T>>> {
    match a.cast::<PyArrayDyn<T>>() {
        Ok(arr) if arr.is_c_contiguous() => Ok(arr),
        _ => Err(layout_err::<T>(name)),
    }
}

/// A read-only view of `a`, a C-contiguous array of `T`.
pub(crate) fn ro<'py, T: Element>(
    a: &Bound<'py, PyAny>,
    name: &str,
) -> Result<PyReadonlyArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readonly()
        .map_err(|e| PyBmojoErr::value(format!("{name}: {e}")))
}

/// A writable view of `a`, a C-contiguous array of `T` that no other view borrows.
pub(crate) fn rw<'py, T: Element>(
    a: &Bound<'py, PyAny>,
    name: &str,
) -> Result<PyReadwriteArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readwrite()
        .map_err(|e| PyBmojoErr::value(format!("{name}: not writable or aliased ({e})")))
}

/// The bytes `[start, end)` an array's elements occupy, or None for an empty array or
/// one that is not an array. Only meaningful for the C-contiguous arrays that [`ro`] and
/// [`rw`] accept (then the elements fill exactly `len * itemsize` bytes from the data
/// pointer).
fn span(a: &Bound<'_, PyAny>) -> Option<(usize, usize)> {
    let arr = a.cast::<PyUntypedArray>().ok()?;
    let bytes = arr.len().checked_mul(arr.dtype().itemsize())?;
    if bytes == 0 {
        return None;
    }
    // SAFETY: `as_array_ptr` points to the live `PyArrayObject` that `arr` holds a
    // reference to; reading its `data` field only reads the pointer value (no element is
    // accessed), and the GIL is held, so no other thread changes the object.
    let start = unsafe { (*arr.as_array_ptr()).fields.data } as usize;
    Some((start, start.checked_add(bytes)?))
}

/// Checks that no array a kernel writes (`writes`) shares memory with another write or
/// with an input (`reads`); `None` entries are skipped. The kernels take a `&mut` slice of
/// each write beside `&` slices of the inputs, which must not alias. NumPy's borrow
/// tracking cannot see it: views of one torch storage are arrays with different base
/// objects. Call it after [`ro`]/[`rw`] have checked contiguity.
pub(crate) fn disjoint(
    writes: &[(&str, Option<&Bound<'_, PyAny>>)],
    reads: &[(&str, Option<&Bound<'_, PyAny>>)],
) -> Result<()> {
    for (i, (name, w)) in writes.iter().enumerate() {
        let Some((lo, hi)) = w.and_then(span) else {
            continue;
        };
        for (other, r) in writes[i + 1..].iter().chain(reads) {
            if let Some((rlo, rhi)) = r.and_then(span) {
                if rlo < hi && lo < rhi {
                    return Err(PyBmojoErr::value(format!(
                        "{name}: shares memory with {other}; an array written in place may \
                         not overlap the call's other arguments"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// [`ro`] of an optional argument.
pub(crate) fn opt_ro<'py, T: Element>(
    a: Opt<'_, 'py>,
    name: &str,
) -> Result<Option<PyReadonlyArrayDyn<'py, T>>> {
    a.as_ref().map(|x| ro(x, name)).transpose()
}

/// [`rw`] of an optional argument.
pub(crate) fn opt_rw<'py, T: Element>(
    a: Opt<'_, 'py>,
    name: &str,
) -> Result<Option<PyReadwriteArrayDyn<'py, T>>> {
    a.as_ref().map(|x| rw(x, name)).transpose()
}

/// The elements of a view.
pub(crate) fn slice<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [T] {
    // Contiguity was checked when the view was taken.
    a.as_slice().unwrap_or(&[])
}

/// The number of dimensions of `a`, an array of any dtype.
pub(crate) fn ndim(a: &Bound<'_, PyAny>, name: &str) -> Result<usize> {
    a.cast::<PyUntypedArray>()
        .map(|x| x.ndim())
        .map_err(|_| PyBmojoErr::type_(format!("{name}: expected an array")))
}

/// The shape of `a`, which must have `ndim` dimensions.
pub(crate) fn shape(a: &Bound<'_, PyAny>, name: &str, ndim: usize) -> Result<Vec<usize>> {
    let arr = a
        .cast::<PyUntypedArray>()
        .map_err(|_| PyBmojoErr::type_(format!("{name}: expected an array")))?;
    if arr.ndim() != ndim {
        return Err(PyBmojoErr::value(format!(
            "{name}: expected {ndim} dimensions, got {}",
            arr.ndim()
        )));
    }
    Ok(arr.shape().to_vec())
}

/// Whether `a` is a float64 (rather than float32) array.
pub(crate) fn is_f64(a: &Bound<'_, PyAny>, name: &str) -> Result<bool> {
    if a.cast::<PyArrayDyn<f64>>().is_ok() {
        Ok(true)
    } else if a.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(false)
    } else {
        Err(PyBmojoErr::type_(format!(
            "{name}: expected a float32 or float64 array"
        )))
    }
}

/// The one shape check: `name` must have exactly the shape `want`.
pub(crate) fn want(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(PyBmojoErr::value(format!(
            "{name}: expected shape {want:?}, got {got:?}"
        )))
    }
}

/// The output array of an update called with `out` (written in place) or without (then a
/// zeroed array of `shape` is made, and also returned second for the binding to hand
/// back).
pub(crate) fn out_or_new<'py, T: Element>(
    py: Python<'py>,
    out: Opt<'_, 'py>,
    shape: &[usize],
) -> (Bound<'py, PyAny>, Option<Bound<'py, PyAny>>) {
    match out {
        Some(o) => (o.clone(), None),
        None => {
            let a = PyArrayDyn::<T>::zeros(py, shape, false).into_any();
            (a.clone(), Some(a))
        }
    }
}
