//! The CUDA driver API, bound lazily (`libcuda.so.1` / `nvcuda.dll`).
//!
//! torch works in each device's primary context, so every driver call that needs a
//! context (module load, launch) makes the device's primary context current on the
//! calling thread for the duration of the call and restores the previous one after.
//! Modules and functions live in process-wide tables and are referred to by index, so a
//! caller can never hand the driver a forged handle.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use crate::args::Params;
use crate::error::{Error, Result};
use crate::{open_library, symbol, Handle};

type CuResult = c_int;
const SUCCESS: CuResult = 0;

const ATTR_MAX_SHARED_PER_BLOCK_OPTIN: c_int = 97;
const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;
const FUNC_ATTR_MAX_DYNAMIC_SHARED: c_int = 8;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

type InitFn = unsafe extern "C" fn(c_uint) -> CuResult;
type IntOutFn = unsafe extern "C" fn(*mut c_int) -> CuResult;
type DeviceGetFn = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type AttrFn = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult;
type NameFn = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult;
type RetainFn = unsafe extern "C" fn(*mut Handle, c_int) -> CuResult;
type CtxGetFn = unsafe extern "C" fn(*mut Handle) -> CuResult;
type CtxSetFn = unsafe extern "C" fn(Handle) -> CuResult;
type ModuleLoadFn = unsafe extern "C" fn(*mut Handle, *const c_void) -> CuResult;
type GetFunctionFn = unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> CuResult;
type FuncSetAttrFn = unsafe extern "C" fn(Handle, c_int, c_int) -> CuResult;
type LaunchFn = unsafe extern "C" fn(
    Handle,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Handle,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type ErrStrFn = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;
type ParamInfoFn = unsafe extern "C" fn(Handle, usize, *mut usize, *mut usize) -> CuResult;
/// `CUDA_ERROR_INVALID_VALUE`: what cuFuncGetParamInfo returns past the last parameter.
const ERROR_INVALID_VALUE: CuResult = 1;

/// What the runtime needs to know about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub capability: (i32, i32),
    /// Largest dynamic shared memory per block after opting in (bytes).
    pub max_shared_optin: i32,
    pub multiprocessors: i32,
}

/// Index of a loaded module in the process-wide table.
pub type ModuleId = usize;
/// Index of a kernel function in the process-wide table.
pub type FunctionId = usize;

struct Module {
    ctx: Handle,
    handle: Handle,
}

struct Function {
    name: String,
    ctx: Handle,
    handle: Handle,
    /// Parameter sizes in bytes (None: the driver cannot tell, before CUDA 12.4).
    param_sizes: Option<Vec<usize>>,
    /// Dynamic shared memory limit set so far (0: the default 48 KB).
    shared_limit: AtomicU32,
}

/// The bound driver library.
pub struct Driver {
    _lib: libloading::Library,
    path: String,
    version: i32,
    device_count_fn: IntOutFn,
    device_get: DeviceGetFn,
    attribute: AttrFn,
    name: NameFn,
    retain: RetainFn,
    ctx_get: CtxGetFn,
    ctx_set: CtxSetFn,
    module_load: ModuleLoadFn,
    get_function: GetFunctionFn,
    func_set_attr: FuncSetAttrFn,
    launch_fn: LaunchFn,
    err_name: ErrStrFn,
    err_string: ErrStrFn,
    /// cuFuncGetParamInfo (CUDA >= 12.4), used to check launches against the kernel.
    param_info: Option<ParamInfoFn>,
    /// Retained primary contexts by device ordinal (never released: torch keeps them too).
    contexts: Mutex<Vec<(i32, Handle)>>,
    modules: Mutex<Vec<Module>>,
    functions: RwLock<Vec<Function>>,
}

static DRIVER: OnceLock<Result<Driver>> = OnceLock::new();

/// The driver, loaded and initialised (`cuInit`) on first use from `path` (default: the
/// system's `libcuda.so.1` / `nvcuda.dll`). Later calls return the same result whatever
/// their `path`.
pub fn get(path: Option<&str>) -> Result<&'static Driver> {
    DRIVER
        .get_or_init(|| Driver::load(path))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether the driver library has been loaded (successfully) by this process.
pub fn is_loaded() -> bool {
    matches!(DRIVER.get(), Some(Ok(_)))
}

fn default_names() -> Vec<String> {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// Restores the thread's previous context when dropped.
struct CtxGuard<'a> {
    driver: &'a Driver,
    previous: Option<Handle>,
}

impl Drop for CtxGuard<'_> {
    fn drop(&mut self) {
        if let Some(prev) = self.previous {
            // SAFETY: `prev` was the thread's current context (possibly NULL, which
            // unbinds) when the guard was made; putting it back is always valid.
            unsafe { (self.driver.ctx_set)(prev) };
        }
    }
}

impl Driver {
    /// Loads the library and calls `cuInit(0)`; no caching (see [`get`]).
    pub fn load(path: Option<&str>) -> Result<Driver> {
        let candidates = match path {
            Some(p) => vec![p.to_string()],
            None => default_names(),
        };
        let (lib, path) = open_library(
            "no CUDA driver: cannot load the driver library",
            &candidates,
        )?;
        // SAFETY: each type alias is the C signature (cuda.h) of the unversioned driver
        // symbol of that name, which every driver since CUDA 11 exports with that ABI;
        // the pointers live in the same struct as `lib`, which keeps the library loaded.
        let d = unsafe {
            Driver {
                device_count_fn: symbol(&lib, "cuDeviceGetCount")?,
                device_get: symbol(&lib, "cuDeviceGet")?,
                attribute: symbol(&lib, "cuDeviceGetAttribute")?,
                name: symbol(&lib, "cuDeviceGetName")?,
                retain: symbol(&lib, "cuDevicePrimaryCtxRetain")?,
                ctx_get: symbol(&lib, "cuCtxGetCurrent")?,
                ctx_set: symbol(&lib, "cuCtxSetCurrent")?,
                module_load: symbol(&lib, "cuModuleLoadData")?,
                get_function: symbol(&lib, "cuModuleGetFunction")?,
                func_set_attr: symbol(&lib, "cuFuncSetAttribute")?,
                launch_fn: symbol(&lib, "cuLaunchKernel")?,
                err_name: symbol(&lib, "cuGetErrorName")?,
                err_string: symbol(&lib, "cuGetErrorString")?,
                param_info: symbol(&lib, "cuFuncGetParamInfo").ok(),
                version: 0,
                contexts: Mutex::new(Vec::new()),
                modules: Mutex::new(Vec::new()),
                functions: RwLock::new(Vec::new()),
                path,
                _lib: lib,
            }
        };
        // SAFETY: symbols bound with their true signatures above.
        let init: InitFn = unsafe { symbol(&d._lib, "cuInit")? };
        // SAFETY: cuInit takes a flags word (must be 0) and may be called repeatedly.
        d.check("cuInit", unsafe { init(0) })?;
        // SAFETY: as above; the out-pointer is valid.
        let version_fn: IntOutFn = unsafe { symbol(&d._lib, "cuDriverGetVersion")? };
        let mut v = 0;
        // SAFETY: valid out-pointer.
        d.check("cuDriverGetVersion", unsafe { version_fn(&mut v) })?;
        Ok(Driver { version: v, ..d })
    }

    /// The driver's CUDA version as `1000 * major + 10 * minor`.
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn static_str(&self, f: ErrStrFn, r: CuResult) -> Option<String> {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: valid out-pointer; the driver stores a pointer to a static string.
        if unsafe { f(r, &mut p) } != SUCCESS || p.is_null() {
            return None;
        }
        // SAFETY: non-null, static, NUL-terminated (driver contract).
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// [`Error::Driver`] unless `r` is `CUDA_SUCCESS`: the call, the code, and the
    /// driver's name and description of it.
    fn check(&self, call: &str, r: CuResult) -> Result<()> {
        if r == SUCCESS {
            return Ok(());
        }
        Err(Error::Driver {
            call: call.to_string(),
            code: r,
            name: self.static_str(self.err_name, r),
            description: self.static_str(self.err_string, r),
        })
    }

    pub fn device_count(&self) -> Result<i32> {
        let mut n = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDeviceGetCount", unsafe {
            (self.device_count_fn)(&mut n)
        })?;
        Ok(n)
    }

    fn device_handle(&self, ordinal: i32) -> Result<c_int> {
        let n = self.device_count()?;
        if ordinal < 0 || ordinal >= n {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} does not exist ({n} device(s) visible)"
            )));
        }
        let mut dev = 0;
        // SAFETY: valid out-pointer; ordinal in range.
        self.check("cuDeviceGet", unsafe {
            (self.device_get)(&mut dev, ordinal)
        })?;
        Ok(dev)
    }

    fn attr(&self, dev: c_int, attr: c_int) -> Result<i32> {
        let mut v = 0;
        // SAFETY: valid out-pointer and device handle; attr is a CUdevice_attribute.
        self.check("cuDeviceGetAttribute", unsafe {
            (self.attribute)(&mut v, attr, dev)
        })?;
        Ok(v)
    }

    /// Name, compute capability and limits of device `ordinal`.
    pub fn device(&self, ordinal: i32) -> Result<DeviceInfo> {
        let dev = self.device_handle(ordinal)?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL included, into `buf`.
        self.check("cuDeviceGetName", unsafe {
            (self.name)(buf.as_mut_ptr(), buf.len() as c_int, dev)
        })?;
        // The last byte stays NUL whatever the driver wrote.
        buf[buf.len() - 1] = 0;
        // SAFETY: `buf` is NUL-terminated (above).
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(DeviceInfo {
            name,
            capability: (
                self.attr(dev, ATTR_CC_MAJOR)?,
                self.attr(dev, ATTR_CC_MINOR)?,
            ),
            max_shared_optin: self.attr(dev, ATTR_MAX_SHARED_PER_BLOCK_OPTIN)?,
            multiprocessors: self.attr(dev, ATTR_MULTIPROCESSOR_COUNT)?,
        })
    }

    /// The primary context of device `ordinal` (the one torch uses), retained once.
    pub(crate) fn primary_context(&self, ordinal: i32) -> Result<Handle> {
        let mut ctxs = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = ctxs.iter().find(|(o, _)| *o == ordinal) {
            return Ok(*c);
        }
        let dev = self.device_handle(ordinal)?;
        let mut ctx = Handle::NULL;
        // SAFETY: valid out-pointer and device handle.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.retain)(&mut ctx, dev)
        })?;
        ctxs.push((ordinal, ctx));
        Ok(ctx)
    }

    /// Makes `ctx` current on this thread until the guard drops.
    fn enter(&self, ctx: Handle) -> Result<CtxGuard<'_>> {
        let mut cur = Handle::NULL;
        // SAFETY: valid out-pointer.
        self.check("cuCtxGetCurrent", unsafe { (self.ctx_get)(&mut cur) })?;
        if cur == ctx {
            return Ok(CtxGuard {
                driver: self,
                previous: None,
            });
        }
        // SAFETY: `ctx` is a retained primary context (alive for the process).
        self.check("cuCtxSetCurrent", unsafe { (self.ctx_set)(ctx) })?;
        Ok(CtxGuard {
            driver: self,
            previous: Some(cur),
        })
    }

    /// Loads a CUBIN into device `ordinal`'s primary context.
    pub fn load_module(&self, ordinal: i32, image: &[u8]) -> Result<ModuleId> {
        // A CUBIN is an ELF file; refuse anything else before the driver parses it.
        if image.len() < 64 || &image[..4] != b"\x7fELF" {
            return Err(Error::Argument(
                "cuModuleLoadData: the image is not a CUBIN (ELF) file".into(),
            ));
        }
        let ctx = self.primary_context(ordinal)?;
        let _g = self.enter(ctx)?;
        let mut m = Handle::NULL;
        // SAFETY: `image` is a complete ELF image that stays alive for the call (the
        // driver copies what it keeps); the primary context is current.
        self.check("cuModuleLoadData", unsafe {
            (self.module_load)(&mut m, image.as_ptr().cast())
        })?;
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        mods.push(Module { ctx, handle: m });
        Ok(mods.len() - 1)
    }

    /// Looks up the kernel `name` (an `extern "C"` symbol) in a loaded module.
    pub fn function(&self, module: ModuleId, name: &str) -> Result<FunctionId> {
        let cname = CString::new(name)
            .map_err(|_| Error::Argument("kernel name contains a NUL byte".into()))?;
        let (ctx, mh) = {
            let mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            let m = mods
                .get(module)
                .ok_or_else(|| Error::Argument(format!("no loaded module with id {module}")))?;
            (m.ctx, m.handle)
        };
        let _g = self.enter(ctx)?;
        let mut f = Handle::NULL;
        // SAFETY: valid out-pointer, module handle from cuModuleLoadData, live C string.
        self.check(&format!("cuModuleGetFunction({name})"), unsafe {
            (self.get_function)(&mut f, mh, cname.as_ptr())
        })?;
        let param_sizes = self.param_sizes(f);
        let mut funcs = self.functions.write().unwrap_or_else(|e| e.into_inner());
        funcs.push(Function {
            name: name.to_string(),
            ctx,
            handle: f,
            param_sizes,
            shared_limit: AtomicU32::new(0),
        });
        Ok(funcs.len() - 1)
    }

    /// Sizes of the parameters of `f`, when the driver can tell.
    fn param_sizes(&self, f: Handle) -> Option<Vec<usize>> {
        let info = self.param_info?;
        let mut sizes = Vec::new();
        // Kernel parameters are limited to 32 KB, so at most 32768 one-byte parameters.
        for i in 0..=32768usize {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: valid function handle and out-pointers; an index past the last
            // parameter is reported as CUDA_ERROR_INVALID_VALUE.
            match unsafe { info(f, i, &mut offset, &mut size) } {
                SUCCESS => sizes.push(size),
                ERROR_INVALID_VALUE => return Some(sizes),
                _ => return None,
            }
        }
        None
    }

    /// Checks `params` against the parameter sizes of `func` where the driver reports
    /// them (CUDA >= 12.4; otherwise only the caller's format string vouches for them).
    pub fn check_params(&self, func: FunctionId, params: &Params) -> Result<()> {
        let funcs = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let f = funcs
            .get(func)
            .ok_or_else(|| Error::Argument(format!("no kernel function with id {func}")))?;
        match &f.param_sizes {
            Some(sizes) => params.check_sizes(&f.name, sizes),
            None => Ok(()),
        }
    }

    /// Launches `func` on `stream` (a raw `CUstream`; 0 is the legacy default stream) with
    /// packed `params`. Asynchronous: errors of the kernel itself surface at the next
    /// synchronising call.
    pub fn launch(
        &self,
        func: FunctionId,
        grid: [u32; 3],
        block: [u32; 3],
        shared_mem: u32,
        stream: usize,
        params: &mut Params,
    ) -> Result<()> {
        if grid.contains(&0) || block.contains(&0) {
            return Err(Error::Argument(format!(
                "launch: grid {grid:?} and block {block:?} must be positive in every dimension"
            )));
        }
        let funcs = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let f = funcs
            .get(func)
            .ok_or_else(|| Error::Argument(format!("no kernel function with id {func}")))?;
        if let Some(sizes) = &f.param_sizes {
            params.check_sizes(&f.name, sizes)?;
        }
        let _g = self.enter(f.ctx)?;
        if shared_mem > DEFAULT_SHARED_LIMIT && shared_mem > f.shared_limit.load(Ordering::Relaxed)
        {
            // SAFETY: valid function handle; the attribute takes a byte count.
            self.check(
                "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                unsafe {
                    (self.func_set_attr)(
                        f.handle,
                        FUNC_ATTR_MAX_DYNAMIC_SHARED,
                        shared_mem as c_int,
                    )
                },
            )?;
            f.shared_limit.fetch_max(shared_mem, Ordering::Relaxed);
        }
        let mut ptrs = params.pointers();
        let kernel_params = if ptrs.is_empty() {
            std::ptr::null_mut()
        } else {
            ptrs.as_mut_ptr()
        };
        // SAFETY: `f.handle` is a function of a module loaded in `f.ctx`, which is current;
        // `kernel_params` points to one pointer per parameter, each to an 8-byte slot whose
        // leading bytes hold the parameter's C value (`Params::pack` checked kinds and
        // ranges). Where the driver reports the kernel's parameter sizes they were checked
        // against the format above, so the driver reads exactly our array; with older
        // drivers the caller's format string must match the kernel's signature. The slots
        // and the array outlive the call (the driver copies them before returning).
        // `stream` is the raw handle torch reports for the current stream of this device.
        let r = unsafe {
            (self.launch_fn)(
                f.handle,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared_mem,
                Handle(stream as *mut c_void),
                kernel_params,
                std::ptr::null_mut(),
            )
        };
        self.check("cuLaunchKernel", r)
    }
}
