//! Kernel arguments: a format string with one code per argument, checked against the
//! values, packed into the `void**` array that `cuLaunchKernel` takes.
//!
//! Codes: `p` device pointer (u64), `i` int32, `l` int64, `f` float32, `d` float64.

use std::ffi::c_void;

use crate::error::{Error, Result};

/// The C type of one kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ptr,
    I32,
    I64,
    F32,
    F64,
}

impl Code {
    pub fn from_char(c: char) -> Option<Code> {
        Some(match c {
            'p' => Code::Ptr,
            'i' => Code::I32,
            'l' => Code::I64,
            'f' => Code::F32,
            'd' => Code::F64,
            _ => return None,
        })
    }

    /// Size of the C type in bytes (the kernel's parameter layout).
    pub fn size(self) -> usize {
        match self {
            Code::I32 | Code::F32 => 4,
            Code::Ptr | Code::I64 | Code::F64 => 8,
        }
    }

    pub fn as_char(self) -> char {
        match self {
            Code::Ptr => 'p',
            Code::I32 => 'i',
            Code::I64 => 'l',
            Code::F32 => 'f',
            Code::F64 => 'd',
        }
    }
}

/// Parses `fmt`, which must have exactly `nargs` codes.
pub fn parse_fmt(fmt: &str, nargs: usize) -> Result<Vec<Code>> {
    let codes = fmt
        .chars()
        .enumerate()
        .map(|(i, c)| {
            Code::from_char(c).ok_or_else(|| {
                Error::Argument(format!(
                    "fmt: unknown code {c:?} at position {i} of {fmt:?} (expected one of p, i, \
                     l, f, d)"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if codes.len() != nargs {
        return Err(Error::Argument(format!(
            "fmt {fmt:?} has {} codes but {nargs} arguments were given",
            codes.len()
        )));
    }
    Ok(codes)
}

/// One argument value as read from the caller, before the range check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Ptr(u64),
    Int(i64),
    Float(f64),
}

/// Packed kernel parameters: each value in its own 8-byte slot, holding the C value's
/// native bytes at the start of the slot.
#[derive(Clone, Debug, Default)]
pub struct Params {
    codes: Vec<Code>,
    slots: Vec<u64>,
}

fn slot<const N: usize>(bytes: [u8; N]) -> u64 {
    let mut b = [0u8; 8];
    b[..N].copy_from_slice(&bytes);
    u64::from_ne_bytes(b)
}

impl Params {
    /// Checks every value against its code (kind and range) and packs it.
    pub fn pack(codes: &[Code], values: &[Value]) -> Result<Params> {
        if codes.len() != values.len() {
            return Err(Error::Argument(format!(
                "{} codes but {} arguments",
                codes.len(),
                values.len()
            )));
        }
        let mut slots = Vec::with_capacity(codes.len());
        for (i, (&c, &v)) in codes.iter().zip(values).enumerate() {
            let bad = |what: &str| {
                Error::Argument(format!("argument {i} (fmt {:?}): {what}", c.as_char()))
            };
            slots.push(match (c, v) {
                (Code::Ptr, Value::Ptr(p)) => slot(p.to_ne_bytes()),
                (Code::I32, Value::Int(x)) => {
                    let x =
                        i32::try_from(x).map_err(|_| bad(&format!("{x} does not fit in int32")))?;
                    slot(x.to_ne_bytes())
                }
                (Code::I64, Value::Int(x)) => slot(x.to_ne_bytes()),
                (Code::F32, Value::Float(x)) => {
                    if x.is_finite() && x.abs() > f32::MAX as f64 {
                        return Err(bad(&format!("{x} does not fit in float32")));
                    }
                    slot((x as f32).to_ne_bytes())
                }
                (Code::F64, Value::Float(x)) => slot(x.to_ne_bytes()),
                (_, v) => return Err(bad(&format!("got {v:?}"))),
            });
        }
        Ok(Params {
            codes: codes.to_vec(),
            slots,
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The codes the values were packed for.
    pub fn codes(&self) -> &[Code] {
        &self.codes
    }

    /// Checks the packed parameters against a kernel's parameter sizes (from the driver):
    /// the driver reads one pointer per kernel parameter, so a short list would make it
    /// read past the array.
    pub fn check_sizes(&self, kernel: &str, sizes: &[usize]) -> Result<()> {
        let ours: Vec<usize> = self.codes.iter().map(|c| c.size()).collect();
        if ours == sizes {
            return Ok(());
        }
        let fmt: String = self.codes.iter().map(|c| c.as_char()).collect();
        Err(Error::Argument(format!(
            "{kernel} takes {} parameters of sizes {sizes:?} bytes, but fmt {fmt:?} gives {} of \
             sizes {ours:?}",
            sizes.len(),
            ours.len()
        )))
    }

    /// The slot bytes (for tests).
    pub fn slot_bytes(&self, i: usize) -> Option<[u8; 8]> {
        self.slots.get(i).map(|s| s.to_ne_bytes())
    }

    /// The `void**` array of `cuLaunchKernel`: one pointer per slot, valid while `self`
    /// is borrowed.
    pub(crate) fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect()
    }
}
