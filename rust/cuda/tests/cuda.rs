//! Tests of the CUDA shim that need no GPU: every embedded source compiles with NVRTC for
//! the supported architectures (when the library is found), a broken source gives the
//! log, argument packing is checked, and a missing driver is an error, not a crash.

use std::path::PathBuf;

use bmojo_cuda::args::{parse_fmt, Code, Params, Value};
use bmojo_cuda::nvrtc::{self, CompileError, Nvrtc};
use bmojo_cuda::{driver, headers, sources, Error};

/// NVRTC from `BMOJO_NVRTC_LIB`, the project venv (torch's pip layout) or by name.
fn nvrtc_lib() -> Option<&'static Nvrtc> {
    let mut candidates: Vec<Option<String>> = Vec::new();
    if let Ok(p) = std::env::var("BMOJO_NVRTC_LIB") {
        candidates.push(Some(p));
    }
    let mut venvs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        venvs.push(v.into());
    }
    if let Ok(h) = std::env::var("HOME") {
        venvs.push(PathBuf::from(h).join(".cache/bmojo_core/venv"));
    }
    for v in venvs {
        let Ok(entries) = std::fs::read_dir(v.join("lib")) else {
            continue;
        };
        for e in entries.flatten() {
            let sp = e.path().join("site-packages/nvidia");
            for rel in ["cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.12"] {
                if sp.join(rel).exists() {
                    candidates.push(Some(sp.join(rel).to_string_lossy().into_owned()));
                }
            }
        }
    }
    candidates.push(None);
    candidates
        .into_iter()
        .find_map(|c| nvrtc::get(c.as_deref()).ok())
}

macro_rules! need_nvrtc {
    () => {
        match nvrtc_lib() {
            Some(l) => l,
            None => {
                println!("SKIPPED: NVRTC not found (set BMOJO_NVRTC_LIB)");
                return;
            }
        }
    };
}

fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "-default-device".into(),
        "-lineinfo".into(),
    ]
}

fn compile(lib: &Nvrtc, src: &str, name: &str, arch: &str) -> Result<Vec<u8>, CompileError> {
    let opts = options(arch);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    lib.compile(src, name, &headers(), &opts)
}

#[test]
fn sources_are_embedded() {
    let names: Vec<&str> = sources().iter().map(|(n, _)| *n).collect();
    for want in [
        "common.cuh",
        "scan.cu",
        "step.cu",
        "conv.cu",
        "companion.cu",
        "bilinear.cu",
        "eidetic.cu",
        "ssd.cu",
    ] {
        assert!(names.contains(&want), "{want} not embedded");
    }
    let common = sources()
        .iter()
        .find(|(n, _)| *n == "common.cuh")
        .unwrap()
        .1;
    assert!(common.contains("bm_io"));
    assert_eq!(headers().len(), 1);
}

// Every embedded source for sm_80/sm_90/sm_100 is compiled by tests/test_cuda_runtime.py,
// which also checks each declared entry point; not repeated here (each full compile costs
// seconds of CI time).

#[test]
fn cubin_holds_the_extern_c_symbols() {
    let lib = need_nvrtc!();
    let src = "#include \"common.cuh\"\n\
        template <typename S> __device__ void twice(S* y, const S* x, long long n) {\n\
            long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n\
            if (i < n) bm_io<S>::store(y + i, 2 * bm_io<S>::load(x + i));\n\
        }\n\
        extern \"C\" __global__ void twice_f32(float* y, const float* x, long long n) { twice(y, x, n); }\n\
        extern \"C\" __global__ void twice_bf16(bm_bf16* y, const bm_bf16* x, long long n) { twice(y, x, n); }\n";
    let cubin = compile(lib, src, "twice.cu", "sm_90").unwrap();
    for sym in ["twice_f32", "twice_bf16"] {
        let needle = format!("\0{sym}\0");
        assert!(
            cubin.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{sym} missing"
        );
    }
    // sm_90 and sm_80 give different machine code.
    assert_ne!(cubin, compile(lib, src, "twice.cu", "sm_80").unwrap());
}

#[test]
fn broken_source_gives_the_log() {
    let lib = need_nvrtc!();
    let src = "extern \"C\" __global__ void k(float* y) { y[0] = undefined_thing; }\n";
    match compile(lib, src, "broken.cu", "sm_90") {
        Err(CompileError::Rejected { log }) => {
            assert!(log.contains("undefined_thing"), "{log}");
            assert!(log.contains("broken.cu"), "{log}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A bad option is a failure too, with NVRTC's message.
    let err = lib
        .compile("", "empty.cu", &[], &["--gpu-architecture=sm_1"])
        .unwrap_err();
    assert!(!err.to_string().is_empty());
    // A NUL byte never reaches NVRTC.
    let err = lib.compile("a\0b", "nul.cu", &[], &[]).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[test]
fn missing_library_is_an_error() {
    let e = Nvrtc::load(Some("/nonexistent/libnvrtc.so.99"))
        .err()
        .expect("loaded a library that does not exist");
    assert!(
        matches!(&e, Error::Unavailable(m) if m.contains("/nonexistent/libnvrtc.so.99")),
        "{e}"
    );
    let e = driver::Driver::load(Some("/nonexistent/libcuda.so.1"))
        .err()
        .expect("loaded a driver that does not exist");
    assert!(
        matches!(&e, Error::Unavailable(m) if m.starts_with("no CUDA driver")),
        "{e}"
    );
}

#[test]
fn fmt_is_checked() {
    assert_eq!(
        parse_fmt("pilfd", 5).unwrap(),
        vec![Code::Ptr, Code::I32, Code::I64, Code::F32, Code::F64]
    );
    let msg = |e: Error| match e {
        Error::Argument(m) => m,
        other => panic!("not an argument error: {other:?}"),
    };
    assert!(msg(parse_fmt("pp", 3).unwrap_err()).contains("2 codes but 3"));
    assert!(msg(parse_fmt("px", 2).unwrap_err()).contains("unknown code 'x'"));
    assert!(parse_fmt("", 0).unwrap().is_empty());
}

#[test]
fn params_are_range_checked_and_packed() {
    let codes = parse_fmt("pilfd", 5).unwrap();
    let vals = [
        Value::Ptr(0xdead_beef_0000),
        Value::Int(-7),
        Value::Int(1 << 40),
        Value::Float(1.5),
        Value::Float(-2.25),
    ];
    let p = Params::pack(&codes, &vals).unwrap();
    assert_eq!(p.len(), 5);
    let b = |i| p.slot_bytes(i).unwrap();
    assert_eq!(u64::from_ne_bytes(b(0)), 0xdead_beef_0000);
    assert_eq!(i32::from_ne_bytes(b(1)[..4].try_into().unwrap()), -7);
    assert_eq!(i64::from_ne_bytes(b(2)), 1 << 40);
    assert_eq!(f32::from_ne_bytes(b(3)[..4].try_into().unwrap()), 1.5);
    assert_eq!(f64::from_ne_bytes(b(4)), -2.25);

    let one = |c: &str, v: Value| Params::pack(&parse_fmt(c, 1).unwrap(), &[v]);
    let msg = |r: Result<Params, Error>| r.unwrap_err().to_string();
    assert!(msg(one("i", Value::Int(1 << 31))).contains("int32"));
    assert!(one("i", Value::Int(i32::MIN as i64)).is_ok());
    assert!(msg(one("f", Value::Float(1e39))).contains("float32"));
    assert!(one("f", Value::Float(f64::INFINITY)).is_ok());
    assert!(one("f", Value::Float(f64::NAN)).is_ok());
    assert!(msg(one("p", Value::Int(3))).contains("argument 0"));
    assert!(one("d", Value::Ptr(3)).is_err());
    assert!(Params::pack(&codes, &vals[..4]).is_err());
}

#[test]
fn params_are_checked_against_the_kernel_signature() {
    let p = Params::pack(
        &parse_fmt("pif", 3).unwrap(),
        &[Value::Ptr(0), Value::Int(1), Value::Float(2.0)],
    )
    .unwrap();
    assert_eq!(p.codes(), &[Code::Ptr, Code::I32, Code::F32]);
    assert!(p.check_sizes("k_f32", &[8, 4, 4]).is_ok());
    let e = p
        .check_sizes("k_f32", &[8, 4, 4, 8])
        .unwrap_err()
        .to_string();
    assert!(e.contains("k_f32 takes 4 parameters"), "{e}");
    assert!(e.contains("\"pif\" gives 3"), "{e}");
    assert!(p.check_sizes("k_f32", &[8, 8, 4]).is_err());
}
