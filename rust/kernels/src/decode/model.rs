//! The model as the decode step reads it: [`Model`] (embedding, [`Layer`]s of [`Norm`],
//! [`Ssm`] and/or [`Attn`], MLP, final norm), built by the binding from a `BMojoLM`'s
//! parameters, and the checks that its pieces fit together.

use super::math::DecodeElem;
use crate::eidetic::Policy;
use crate::error::{Error, Result};

/// A linear map `(n_out, n_in)` row-major (torch's `Linear.weight`) with optional bias.
pub struct Linear<T> {
    pub w: Vec<T>,
    pub b: Option<Vec<T>>,
    pub n_out: usize,
    pub n_in: usize,
}

impl<T: Copy> Linear<T> {
    pub fn new(name: &str, w: &[T], b: Option<&[T]>, n_out: usize, n_in: usize) -> Result<Self> {
        if w.len() != n_out * n_in {
            return Err(Error::value(
                name,
                format!("a ({n_out}, {n_in}) weight"),
                format!("{} elements", w.len()),
            ));
        }
        if let Some(b) = b {
            if b.len() != n_out {
                return Err(Error::value(name, format!("a bias of {n_out}"), b.len()));
            }
        }
        Ok(Linear {
            w: w.to_vec(),
            b: b.map(<[T]>::to_vec),
            n_out,
            n_in,
        })
    }
}

pub struct Norm<T> {
    pub w: Vec<T>,
    pub b: Vec<T>,
    pub eps: T,
}

/// The Mamba mixer's parameters (A given as `-exp(A_log)`).
pub struct Ssm<T> {
    pub d_inner: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    pub d_conv: usize,
    pub in_proj: Linear<T>,
    /// `(d_inner, d_conv)`.
    pub conv_w: Vec<T>,
    pub conv_b: Option<Vec<T>>,
    pub x_proj: Linear<T>,
    /// `(d_inner, dt_rank)` with its bias (the Δ bias).
    pub dt_proj: Linear<T>,
    /// `(d_inner, d_state)`.
    pub a: Vec<T>,
    pub d: Vec<T>,
    pub out_proj: Linear<T>,
}

pub struct Attn<T> {
    pub n_heads: usize,
    pub qkv: Linear<T>,
    pub out_proj: Linear<T>,
}

pub struct Layer<T> {
    pub norm1: Norm<T>,
    pub ssm: Option<Ssm<T>>,
    pub attn: Option<Attn<T>>,
    pub window: usize,
    pub n_fading: usize,
    pub n_eidetic: usize,
    /// Innovation predictor taps (`innovation_taps` of `1/k`).
    pub taps: Vec<T>,
    pub chi2: bool,
    pub rate: T,
    pub floor: T,
    pub policy: Policy,
    pub norm2: Norm<T>,
    pub fc1: Linear<T>,
    pub fc2: Linear<T>,
}

pub struct Model<T> {
    pub vocab: usize,
    pub d_model: usize,
    /// `(vocab, d_model)`, also the head.
    pub embedding: Vec<T>,
    pub layers: Vec<Layer<T>>,
    pub norm_f: Norm<T>,
}

impl<T: DecodeElem> Model<T> {
    /// Checks that every piece fits together (the binding builds models from arrays).
    pub fn check(&self) -> Result<()> {
        let d = self.d_model;
        if d == 0 || self.vocab == 0 {
            return Err(Error::expected("d_model and vocab_size", ">= 1"));
        }
        if self.embedding.len() != self.vocab * d {
            return Err(Error::expected(
                "embedding",
                format!("({}, {d})", self.vocab),
            ));
        }
        check_norm("norm_f", &self.norm_f, d)?;
        for (i, l) in self.layers.iter().enumerate() {
            l.check(d).map_err(|e| e.context(format!("layers.{i}.")))?;
        }
        Ok(())
    }
}

/// A LayerNorm of `d` features.
fn check_norm<T>(name: &str, n: &Norm<T>, d: usize) -> Result<()> {
    if n.w.len() != d || n.b.len() != d {
        return Err(Error::expected(name, format!("weight and bias of {d}")));
    }
    Ok(())
}

impl<T> Linear<T> {
    /// An `(o, i)` map (with a bias of `o` if any).
    fn check(&self, name: &str, o: usize, i: usize) -> Result<()> {
        if self.n_out != o || self.n_in != i || self.w.len() != o * i {
            return Err(Error::expected(name, format!("a ({o}, {i}) weight")));
        }
        if self.b.as_ref().is_some_and(|b| b.len() != o) {
            return Err(Error::expected(name, format!("a bias of {o}")));
        }
        Ok(())
    }
}

impl<T: DecodeElem> Layer<T> {
    /// Checks the pieces of one block of a `d`-wide model (names relative to the block).
    fn check(&self, d: usize) -> Result<()> {
        check_norm("norm1", &self.norm1, d)?;
        check_norm("norm2", &self.norm2, d)?;
        let ff = self.fc1.n_out;
        self.fc1.check("fc1", ff, d)?;
        self.fc2.check("fc2", d, ff)?;
        let (w, mf, me) = (self.window, self.n_fading, self.n_eidetic);
        if (w == 0) != self.attn.is_none() {
            return Err(Error::invalid("attn", "present exactly when window > 0"));
        }
        if (w == 0 || mf > 0 || me > 0) != self.ssm.is_some() {
            return Err(Error::invalid(
                "ssm",
                "present exactly when window == 0 or memory tokens are used",
            ));
        }
        if w == 0 && (mf > 0 || me > 0) {
            return Err(Error::invalid("window", "memory tokens need a window > 0"));
        }
        if me > 0 && self.taps.is_empty() {
            return Err(Error::expected("taps", "at least one innovation tap"));
        }
        if me > 0 && !(self.rate > T::ZERO && self.rate <= T::ONE && self.floor > T::ZERO) {
            return Err(Error::expected(
                "rate and floor",
                "an innovation rate in (0, 1] and a floor > 0",
            ));
        }
        if let Some(a) = &self.attn {
            if a.n_heads == 0 || !d.is_multiple_of(a.n_heads) {
                return Err(Error::invalid("attn", "n_heads must divide d_model"));
            }
            a.qkv.check("attn.qkv", 3 * d, d)?;
            a.out_proj.check("attn.out_proj", d, d)?;
        }
        if let Some(s) = &self.ssm {
            let (di, n, r, k) = (s.d_inner, s.d_state, s.dt_rank, s.d_conv);
            if di == 0 || n == 0 || r == 0 || k == 0 {
                return Err(Error::invalid("ssm", "sizes must be >= 1"));
            }
            s.in_proj.check("ssm.in_proj", 2 * di, d)?;
            s.x_proj.check("ssm.x_proj", r + 2 * n, di)?;
            s.dt_proj.check("ssm.dt_proj", di, r)?;
            s.out_proj.check("ssm.out_proj", d, di)?;
            if s.dt_proj.b.is_none() {
                return Err(Error::expected("ssm.dt_proj", "a bias"));
            }
            if s.conv_w.len() != di * k || s.conv_b.as_ref().is_some_and(|b| b.len() != di) {
                return Err(Error::expected(
                    "ssm.conv",
                    "a (d_inner, d_conv) weight and (d_inner,) bias",
                ));
            }
            if s.a.len() != di * n || s.d.len() != di {
                return Err(Error::expected(
                    "ssm",
                    "A (d_inner, d_state) and D (d_inner,)",
                ));
            }
        }
        Ok(())
    }
}
