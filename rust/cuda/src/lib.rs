//! CUDA runtime shim of bmojo_core, free of any Python dependency.
//!
//! * [`nvrtc`]: run-time compilation of the kernel sources to CUBIN (NVRTC bound lazily from
//!   an explicit path or by name);
//! * [`driver`]: the driver API (`libcuda.so.1` / `nvcuda.dll`, bound lazily): devices,
//!   primary contexts, modules, launches;
//! * [`args`]: checked packing of kernel arguments from a format string;
//! * [`sources`]: the kernel sources of `cuda/`, embedded at build time.
//!
//! * [`error`]: the typed [`Error`] of every call.
//!
//! Nothing here panics on bad input: every failure is an [`Error`] that names the call
//! and, for the driver, the driver's own error name and string.

pub mod args;
pub mod driver;
pub mod error;
pub mod nvrtc;

pub use error::{Error, Result};

use std::ffi::c_void;

/// The files of `cuda/` (name, text): `common.cuh` is served to NVRTC as an in-memory
/// header, each `.cu` file is one translation unit.
const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../cuda/common.cuh")),
    ("scan.cu", include_str!("../../../cuda/scan.cu")),
    ("step.cu", include_str!("../../../cuda/step.cu")),
    ("conv.cu", include_str!("../../../cuda/conv.cu")),
    ("companion.cu", include_str!("../../../cuda/companion.cu")),
    ("bilinear.cu", include_str!("../../../cuda/bilinear.cu")),
    ("eidetic.cu", include_str!("../../../cuda/eidetic.cu")),
    ("ssd.cu", include_str!("../../../cuda/ssd.cu")),
];

/// Every embedded source, `(file name, text)`.
pub fn sources() -> &'static [(&'static str, &'static str)] {
    SOURCES
}

/// The headers among [`sources`] (`.cuh`), as NVRTC in-memory headers.
pub fn headers() -> Vec<(&'static str, &'static str)> {
    SOURCES
        .iter()
        .copied()
        .filter(|(n, _)| n.ends_with(".cuh"))
        .collect()
}

/// An opaque driver or NVRTC handle. The driver's handles (contexts, modules, functions,
/// programs) are process-wide values, not tied to the thread that created them.
/// `repr(transparent)`: passed by value to C where the API takes a pointer-typed handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Handle(pub(crate) *mut c_void);

// SAFETY: a handle is only an opaque token that the library interprets; the driver API is
// thread-safe and accepts its handles from any thread, so moving or sharing the token
// between threads cannot cause a data race on our side.
unsafe impl Send for Handle {}
// SAFETY: as above; `Handle` has no interior state.
unsafe impl Sync for Handle {}

impl Handle {
    pub(crate) const NULL: Handle = Handle(std::ptr::null_mut());
}

/// Copies the function pointer `name` out of `lib`.
///
/// # Safety
/// `T` must be the exact C signature (as an `unsafe extern "C" fn`) of the symbol, and the
/// pointer must not be used after `lib` is dropped.
pub(crate) unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T> {
    // SAFETY: forwarded to the caller (see above).
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| Error::Unavailable(format!("symbol {name} not found: {}", describe(&e))))
}

/// libloading's message with the system's reason (`dlerror`), which it keeps as the source.
fn describe(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

/// Loads the first of `candidates` that opens; otherwise [`Error::Unavailable`] with
/// `what` (which library) and every failure.
pub(crate) fn open_library(
    what: &str,
    candidates: &[String],
) -> Result<(libloading::Library, String)> {
    let mut errors = Vec::new();
    for c in candidates {
        // SAFETY: loading a shared library runs its initialisers; the candidates are the
        // vendor's CUDA libraries (NVRTC, the driver), whose initialisers are sound to run
        // in any process.
        match unsafe { libloading::Library::new(c.as_str()) } {
            Ok(l) => return Ok((l, c.clone())),
            Err(e) => {
                let d = describe(&e);
                errors.push(if d.contains(c.as_str()) {
                    d
                } else {
                    format!("{c}: {d}")
                });
            }
        }
    }
    Err(Error::Unavailable(format!(
        "{what} ({})",
        errors.join("; ")
    )))
}
