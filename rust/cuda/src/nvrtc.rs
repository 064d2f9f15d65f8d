//! NVRTC: run-time compilation of CUDA C++ to CUBIN.
//!
//! The library is bound lazily: from an explicit path (the Python layer finds torch's pip
//! copy) or by the loader's search path. Loaded libraries stay loaded for the life of the
//! process, so the function pointers copied out of them never dangle.

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::{open_library, symbol, Handle};

type Status = c_int;
const SUCCESS: Status = 0;
/// `NVRTC_ERROR_COMPILATION`: the source was rejected (the log says why).
const ERROR_COMPILATION: Status = 6;

type CreateFn = unsafe extern "C" fn(
    *mut Handle,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> Status;
type CompileFn = unsafe extern "C" fn(Handle, c_int, *const *const c_char) -> Status;
type SizeFn = unsafe extern "C" fn(Handle, *mut usize) -> Status;
type ReadFn = unsafe extern "C" fn(Handle, *mut c_char) -> Status;
type DestroyFn = unsafe extern "C" fn(*mut Handle) -> Status;
type ErrStrFn = unsafe extern "C" fn(Status) -> *const c_char;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status;

/// Why a compilation produced no CUBIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompileError {
    /// NVRTC rejected the source: `log` is its diagnostic output.
    Rejected { log: String },
    /// Any other failure (bad option, NUL byte in the source, API error), with the log when
    /// NVRTC produced one.
    Failed { message: String, log: String },
}

impl CompileError {
    /// The NVRTC log (may be empty).
    pub fn log(&self) -> &str {
        match self {
            CompileError::Rejected { log } | CompileError::Failed { log, .. } => log,
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Rejected { log } => write!(f, "NVRTC compilation failed:\n{log}"),
            CompileError::Failed { message, log } if log.is_empty() => write!(f, "{message}"),
            CompileError::Failed { message, log } => write!(f, "{message}\n{log}"),
        }
    }
}

impl std::error::Error for CompileError {}

/// A loaded NVRTC library.
pub struct Nvrtc {
    _lib: libloading::Library,
    path: String,
    version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: ReadFn,
    cubin_size: SizeFn,
    cubin: ReadFn,
    destroy: DestroyFn,
    error_string: ErrStrFn,
}

/// Names tried when no path is given (newest first).
fn default_names() -> Vec<String> {
    let names: &[&str] = if cfg!(windows) {
        &[
            "nvrtc64_130_0.dll",
            "nvrtc64_120_0.dll",
            "nvrtc64_112_0.dll",
        ]
    } else {
        &[
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11.2",
        ]
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// Loaded libraries by requested path (`None`: by name), leaked on purpose: they stay
/// loaded for the life of the process.
static LOADED: Mutex<Vec<(Option<String>, &'static Nvrtc)>> = Mutex::new(Vec::new());

/// The NVRTC library at `path` (or found by name), loaded once per distinct `path`.
pub fn get(path: Option<&str>) -> Result<&'static Nvrtc> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, lib)) = loaded.iter().find(|(p, _)| p.as_deref() == path) {
        return Ok(lib);
    }
    let lib: &'static Nvrtc = Box::leak(Box::new(Nvrtc::load(path)?));
    loaded.push((path.map(str::to_string), lib));
    Ok(lib)
}

/// Whether any NVRTC library has been loaded by this process through [`get`].
pub fn is_loaded() -> bool {
    !LOADED.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

/// Frees an NVRTC program when dropped.
struct Program<'a> {
    nvrtc: &'a Nvrtc,
    handle: Handle,
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: `handle` was created by nvrtcCreateProgram of this library and is
        // destroyed exactly once, here.
        unsafe { (self.nvrtc.destroy)(&mut self.handle) };
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, CompileError> {
    CString::new(s).map_err(|_| CompileError::Failed {
        message: format!("{what} contains a NUL byte"),
        log: String::new(),
    })
}

impl Nvrtc {
    /// Loads NVRTC from `path`, or by the loader's search path when `None`.
    pub fn load(path: Option<&str>) -> Result<Nvrtc> {
        let candidates = match path {
            Some(p) => vec![p.to_string()],
            None => default_names(),
        };
        let (lib, path) = open_library("cannot load NVRTC", &candidates)?;
        // SAFETY: each type alias is the C signature of the symbol of the same name in the
        // NVRTC API (nvrtc.h, stable since CUDA 11); the pointers are stored next to `lib`
        // in the same struct, which keeps the library loaded while they exist.
        let nv = unsafe {
            Nvrtc {
                create: symbol::<CreateFn>(&lib, "nvrtcCreateProgram")?,
                compile: symbol::<CompileFn>(&lib, "nvrtcCompileProgram")?,
                log_size: symbol::<SizeFn>(&lib, "nvrtcGetProgramLogSize")?,
                log: symbol::<ReadFn>(&lib, "nvrtcGetProgramLog")?,
                cubin_size: symbol::<SizeFn>(&lib, "nvrtcGetCUBINSize")?,
                cubin: symbol::<ReadFn>(&lib, "nvrtcGetCUBIN")?,
                destroy: symbol::<DestroyFn>(&lib, "nvrtcDestroyProgram")?,
                error_string: symbol::<ErrStrFn>(&lib, "nvrtcGetErrorString")?,
                version: {
                    let f = symbol::<VersionFn>(&lib, "nvrtcVersion")?;
                    let (mut major, mut minor) = (0, 0);
                    let st = f(&mut major, &mut minor);
                    if st != SUCCESS {
                        return Err(Error::Unavailable(format!(
                            "nvrtcVersion failed with status {st}"
                        )));
                    }
                    (major, minor)
                },
                _lib: lib,
                path,
            }
        };
        Ok(nv)
    }

    /// `(major, minor)` of the library.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The path or name the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn describe(&self, st: Status) -> String {
        // SAFETY: nvrtcGetErrorString returns a pointer to a static NUL-terminated string
        // for any status value (or NULL, handled).
        let p = unsafe { (self.error_string)(st) };
        if p.is_null() {
            return format!("NVRTC status {st}");
        }
        // SAFETY: non-null, NUL-terminated, static (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, call: &str, st: Status) -> Result<(), CompileError> {
        if st == SUCCESS {
            Ok(())
        } else {
            Err(CompileError::Failed {
                message: format!("{call} failed: {}", self.describe(st)),
                log: String::new(),
            })
        }
    }

    /// Reads one of the program's byte outputs (log or CUBIN) through its size/read pair.
    fn read(&self, prog: &Program<'_>, size: SizeFn, read: ReadFn) -> Result<Vec<u8>, Status> {
        let mut n = 0usize;
        // SAFETY: valid program handle and a valid out-pointer.
        let st = unsafe { size(prog.handle, &mut n) };
        if st != SUCCESS {
            return Err(st);
        }
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: NVRTC writes exactly the `n` bytes reported by the size call into `buf`,
        // which holds at least `n` bytes.
        let st = unsafe { read(prog.handle, buf.as_mut_ptr().cast()) };
        if st != SUCCESS {
            return Err(st);
        }
        buf.truncate(n);
        Ok(buf)
    }

    fn program_log(&self, prog: &Program<'_>) -> String {
        match self.read(prog, self.log_size, self.log) {
            Ok(mut b) => {
                // The log is NUL-terminated.
                while b.last() == Some(&0) {
                    b.pop();
                }
                String::from_utf8_lossy(&b).trim_end().to_string()
            }
            Err(st) => format!("(no log: {})", self.describe(st)),
        }
    }

    /// Compiles `source` (named `name` in diagnostics) with the in-memory `headers`
    /// (`(include name, text)`) and NVRTC `options`; returns the CUBIN. The options must
    /// select a real architecture (`--gpu-architecture=sm_XY`) for a CUBIN to exist.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        headers: &[(&str, &str)],
        options: &[&str],
    ) -> Result<Vec<u8>, CompileError> {
        let src = cstring("source", source)?;
        let cname = cstring("program name", name)?;
        let hnames = headers
            .iter()
            .map(|(n, _)| cstring("header name", n))
            .collect::<Result<Vec<_>, _>>()?;
        let htexts = headers
            .iter()
            .map(|(n, t)| cstring(&format!("header {n}"), t))
            .collect::<Result<Vec<_>, _>>()?;
        let opts = options
            .iter()
            .map(|o| cstring("option", o))
            .collect::<Result<Vec<_>, _>>()?;
        let hname_ptrs: Vec<*const c_char> = hnames.iter().map(|s| s.as_ptr()).collect();
        let htext_ptrs: Vec<*const c_char> = htexts.iter().map(|s| s.as_ptr()).collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        let count = |n: usize, what: &str| {
            c_int::try_from(n).map_err(|_| CompileError::Failed {
                message: format!("too many {what}"),
                log: String::new(),
            })
        };
        let (nh, no) = (
            count(headers.len(), "headers")?,
            count(options.len(), "options")?,
        );

        let mut handle = Handle::NULL;
        // SAFETY: every pointer is a live NUL-terminated string (owned by the CStrings
        // above, which outlive the call); the two header arrays have `nh` entries each.
        let st = unsafe {
            (self.create)(
                &mut handle,
                src.as_ptr(),
                cname.as_ptr(),
                nh,
                htext_ptrs.as_ptr(),
                hname_ptrs.as_ptr(),
            )
        };
        self.check("nvrtcCreateProgram", st)?;
        let prog = Program {
            nvrtc: self,
            handle,
        };
        // SAFETY: valid program; `opt_ptrs` holds `no` live NUL-terminated strings.
        let st = unsafe { (self.compile)(prog.handle, no, opt_ptrs.as_ptr()) };
        if st != SUCCESS {
            let log = self.program_log(&prog);
            return Err(if st == ERROR_COMPILATION {
                CompileError::Rejected { log }
            } else {
                CompileError::Failed {
                    message: format!("nvrtcCompileProgram failed: {}", self.describe(st)),
                    log,
                }
            });
        }
        match self.read(&prog, self.cubin_size, self.cubin) {
            Ok(cubin) if !cubin.is_empty() => Ok(cubin),
            r => Err(CompileError::Failed {
                message: format!(
                    "nvrtcGetCUBIN failed: {} (a CUBIN needs a real architecture, \
                     --gpu-architecture=sm_XY)",
                    r.err().map_or("empty CUBIN".into(), |st| self.describe(st))
                ),
                log: String::new(),
            }),
        }
    }
}
