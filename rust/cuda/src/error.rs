//! The CUDA shim's one error type: what failed, told apart by what the caller can do
//! about it (install CUDA, fix the launch, read the compiler's log).

use std::fmt;

use crate::nvrtc::CompileError;

/// Why a CUDA call of the shim failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// CUDA is not usable here: a library (NVRTC, the driver) could not be loaded, lacks a
    /// symbol, or a requested device does not exist. The message says which and why.
    Unavailable(String),
    /// A driver API call returned an error: the call, the `CUresult` code and the
    /// driver's own name and description of it (when the driver gives them).
    Driver {
        call: String,
        code: i32,
        name: Option<String>,
        description: Option<String>,
    },
    /// NVRTC produced no CUBIN; the log says why.
    Compile(CompileError),
    /// Bad arguments of a launch or a look-up (format string, value ranges, parameter
    /// sizes, grid, module or function ids, an image that is no CUBIN); nothing reached
    /// the driver.
    Argument(String),
}

/// Result of a call of the shim.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(m) | Error::Argument(m) => write!(f, "{m}"),
            Error::Driver {
                call,
                code,
                name,
                description,
            } => {
                write!(f, "{call} failed: ")?;
                match name {
                    Some(n) => write!(f, "{n}")?,
                    None => write!(f, "CUresult {code}")?,
                }
                match description {
                    Some(d) => write!(f, " ({d})"),
                    None => Ok(()),
                }
            }
            Error::Compile(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Compile(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CompileError> for Error {
    fn from(e: CompileError) -> Error {
        Error::Compile(e)
    }
}
