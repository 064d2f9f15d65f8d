//! Run-time choice of the instruction-set level.
//!
//! Kernels are generic over [`Vector`]; [`dispatch`] instantiates a [`Kernel`] for the
//! requested level inside a function compiled with that level's target features. Shipped
//! builds never use `target-cpu=native`: every level is compiled into the same binary and
//! picked at run time.

use super::lanes::{Bits, Lanes};
use super::vector::Vector;

/// Instruction-set levels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// One lane at a time: the plain scalar path.
    Scalar,
    /// 16-byte vectors of the architecture's baseline (SSE2 on x86-64, NEON on aarch64),
    /// written as portable lane arrays that the compiler vectorises.
    Baseline,
    /// AVX2 + FMA, 32-byte vectors.
    Avx2,
    /// AVX-512F, 64-byte vectors.
    Avx512,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Avx512, Level::Avx2, Level::Baseline, Level::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Baseline if cfg!(target_arch = "aarch64") => "neon",
            Level::Baseline if cfg!(target_arch = "x86_64") => "sse2",
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            Level::Scalar | Level::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => Level::Avx2.is_supported() && std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Level::Avx2 | Level::Avx512 => false,
        }
    }

    /// Levels this CPU supports, best first.
    pub fn supported() -> Vec<Level> {
        Level::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }

    pub fn best() -> Level {
        Level::supported()[0]
    }
}

/// Element types with a vector type per level.
pub trait SimdElem: Bits + core::ops::Div<Output = Self> {
    type Scalar: Vector<E = Self>;
    type Base: Vector<E = Self>;
    #[cfg(target_arch = "x86_64")]
    type V256: Vector<E = Self>;
    #[cfg(target_arch = "x86_64")]
    type V512: Vector<E = Self>;
}

impl SimdElem for f32 {
    type Scalar = Lanes<f32, 1>;
    type Base = Lanes<f32, 4>;
    #[cfg(target_arch = "x86_64")]
    type V256 = super::x86::F32x8;
    #[cfg(target_arch = "x86_64")]
    type V512 = super::x86::F32x16;
}

impl SimdElem for f64 {
    type Scalar = Lanes<f64, 1>;
    type Base = Lanes<f64, 2>;
    #[cfg(target_arch = "x86_64")]
    type V256 = super::x86::F64x4;
    #[cfg(target_arch = "x86_64")]
    type V512 = super::x86::F64x8;
}

/// A piece of work written once for any vector type. Implementations mark `run`
/// `#[inline(always)]` so that it is compiled inside the per-level entry points below.
/// Helpers it calls must be `#[inline(always)]` functions too; hot vector code must not
/// sit in closures: a closure is compiled without the level's target features, so its
/// intrinsics stay out-of-line calls (seen in profiles as `run::{{closure}}`).
pub trait Kernel<T: SimdElem> {
    type Out;
    fn run<V: Vector<E = T>>(self) -> Self::Out;
}

/// Runs `k` at `level`, or at the best supported level below it (so an unsupported level
/// can never reach instructions the CPU lacks).
#[inline]
pub fn dispatch<T: SimdElem, K: Kernel<T>>(level: Level, k: K) -> K::Out {
    let level = if level.is_supported() {
        level
    } else {
        Level::best().min(level)
    };
    match level {
        Level::Scalar => k.run::<T::Scalar>(),
        Level::Baseline => k.run::<T::Base>(),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level.is_supported()` checked AVX2+FMA at run time.
        Level::Avx2 => unsafe { run_avx2(k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level.is_supported()` checked AVX-512F, AVX2 and FMA at run time.
        Level::Avx512 => unsafe { run_avx512(k) },
        #[cfg(not(target_arch = "x86_64"))]
        Level::Avx2 | Level::Avx512 => k.run::<T::Base>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: SimdElem, K: Kernel<T>>(k: K) -> K::Out {
    k.run::<T::V256>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<T: SimdElem, K: Kernel<T>>(k: K) -> K::Out {
    k.run::<T::V512>()
}
