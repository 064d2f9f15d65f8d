//! `bmojo_core._core.ssd`: Mamba-2's multi-head SSD scan (design §2.4), forward and
//! backward.

use bmojo_kernels::ssd::{self, BwdOut, FwdOut, RowStrides, SsdArgs, StepArgs};
use bmojo_kernels::SimdElem;
use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::args::{
    by_float, disjoint, is_f64, opt_ro, opt_rw, out_or_new, ro, rw, shape, slice, want, Opt,
};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

/// The inputs of an SSD scan as Python passed them.
struct Raw<'a, 'py> {
    x: &'a Bound<'py, PyAny>,
    dt: &'a Bound<'py, PyAny>,
    a: &'a Bound<'py, PyAny>,
    b: &'a Bound<'py, PyAny>,
    c: &'a Bound<'py, PyAny>,
    d: Opt<'a, 'py>,
    z: Opt<'a, 'py>,
    dt_bias: Opt<'a, 'py>,
    h0: Opt<'a, 'py>,
    seq_idx: Opt<'a, 'py>,
    softplus: bool,
    limit: Option<(f64, f64)>,
    /// `(batch, len, heads, head_dim, groups, N)`.
    dims: (usize, usize, usize, usize, usize, usize),
    /// Row strides of `(x, dt, B, C, z)`.
    rows: (usize, usize, usize, usize, usize),
}

/// Typed read-only views of the inputs.
struct Inputs<'py, T: Element> {
    dims: [usize; 6],
    rows: RowStrides,
    x: PyReadonlyArrayDyn<'py, T>,
    dt: PyReadonlyArrayDyn<'py, T>,
    a: PyReadonlyArrayDyn<'py, T>,
    b: PyReadonlyArrayDyn<'py, T>,
    c: PyReadonlyArrayDyn<'py, T>,
    d: Option<PyReadonlyArrayDyn<'py, T>>,
    z: Option<PyReadonlyArrayDyn<'py, T>>,
    dt_bias: Option<PyReadonlyArrayDyn<'py, T>>,
    h0: Option<PyReadonlyArrayDyn<'py, T>>,
    seq_idx: Option<PyReadonlyArrayDyn<'py, i64>>,
    softplus: bool,
    limit: Option<(T, T)>,
}

impl<'py> Raw<'_, 'py> {
    fn borrow<T: Element + SimdElem>(&self) -> Result<Inputs<'py, T>> {
        let limit = match self.limit {
            Some((lo, hi)) if !(0.0 <= lo && lo <= hi) => {
                return Err(PyBmojoErr::value(format!(
                    "dt_limit: expected 0 <= low <= high, got ({lo}, {hi})"
                )))
            }
            Some((lo, hi)) => Some((T::from_f64(lo), T::from_f64(hi))),
            None => None,
        };
        Ok(Inputs {
            dims: [
                self.dims.0,
                self.dims.1,
                self.dims.2,
                self.dims.3,
                self.dims.4,
                self.dims.5,
            ],
            rows: RowStrides {
                x: self.rows.0,
                dt: self.rows.1,
                b: self.rows.2,
                c: self.rows.3,
                z: self.rows.4,
            },
            x: ro(self.x, "x")?,
            dt: ro(self.dt, "dt")?,
            a: ro(self.a, "A")?,
            b: ro(self.b, "B")?,
            c: ro(self.c, "C")?,
            d: opt_ro(self.d, "D")?,
            z: opt_ro(self.z, "z")?,
            dt_bias: opt_ro(self.dt_bias, "dt_bias")?,
            h0: opt_ro(self.h0, "initial_states")?,
            seq_idx: opt_ro(self.seq_idx, "seq_idx")?,
            softplus: self.softplus,
            limit,
        })
    }

    /// Every input, for the aliasing check of the outputs.
    fn reads(&self) -> Vec<(&'static str, Option<&Bound<'py, PyAny>>)> {
        vec![
            ("x", Some(self.x)),
            ("dt", Some(self.dt)),
            ("A", Some(self.a)),
            ("B", Some(self.b)),
            ("C", Some(self.c)),
            ("D", self.d.as_ref()),
            ("z", self.z.as_ref()),
            ("dt_bias", self.dt_bias.as_ref()),
            ("initial_states", self.h0.as_ref()),
        ]
    }
}

impl<T: Element + Copy> Inputs<'_, T> {
    fn args(&self) -> SsdArgs<'_, T> {
        let [batch, len, heads, hdim, groups, dstate] = self.dims;
        SsdArgs {
            batch,
            len,
            heads,
            hdim,
            groups,
            dstate,
            x: slice(&self.x),
            dt: slice(&self.dt),
            a: slice(&self.a),
            b: slice(&self.b),
            c: slice(&self.c),
            d: self.d.as_ref().map(slice),
            z: self.z.as_ref().map(slice),
            dt_bias: self.dt_bias.as_ref().map(slice),
            h0: self.h0.as_ref().map(slice),
            seq_idx: self.seq_idx.as_ref().map(slice),
            softplus: self.softplus,
            limit: self.limit,
            rows: self.rows,
        }
    }
}

/// Forward, with `dims = (batch, L, heads, P, groups, N)` and the per-token inputs read
/// as rows (one per (batch, time), `rows` their strides for `(x, dt, B, C, z)`, each
/// array a flat span of exactly `(batch·L − 1)·stride + width` elements): `x (batch, L,
/// heads, P)`, `dt (batch, L, heads)`, `a (heads,)`, `b`/`c` `(batch, L, groups, N)`, `d (heads,)|(heads, P)`, `z` like x, `dt_bias (heads,)`,
/// `h0 (batch, heads, P, N)`, `seq_idx (batch, L)` int64, `limit` Δ's clamp (or None);
/// writes `out (batch, heads, L, P)` (`(batch, L, heads, P)` if `token_major`), `last (batch, heads, P, N)` and `ckpt (batch,
/// heads, ceil(L / CHECKPOINT_CHUNK), P, N)` (an empty array: no checkpoints).
#[pyfunction]
#[pyo3(signature = (x, dt, a, b, c, d, z, dt_bias, h0, seq_idx, softplus, limit, dims, rows, out, last,
                    ckpt, token_major=false))]
#[allow(clippy::too_many_arguments)]
fn ssd_fwd(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    dt: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    c: Bound<'_, PyAny>,
    d: Option<Bound<'_, PyAny>>,
    z: Option<Bound<'_, PyAny>>,
    dt_bias: Option<Bound<'_, PyAny>>,
    h0: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    softplus: bool,
    limit: Option<(f64, f64)>,
    dims: (usize, usize, usize, usize, usize, usize),
    rows: (usize, usize, usize, usize, usize),
    out: Bound<'_, PyAny>,
    last: Bound<'_, PyAny>,
    ckpt: Bound<'_, PyAny>,
    token_major: bool,
) -> Result<()> {
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        raw: &Raw<'_, '_>,
        out: &Bound<'_, PyAny>,
        last: &Bound<'_, PyAny>,
        ckpt: &Bound<'_, PyAny>,
        token_major: bool,
    ) -> Result<()> {
        let i = raw.borrow::<T>()?;
        let (mut o, mut l, mut k) = (
            rw::<T>(out, "out")?,
            rw::<T>(last, "last_state")?,
            rw::<T>(ckpt, "checkpoints")?,
        );
        disjoint(
            &[
                ("out", Some(out)),
                ("last_state", Some(last)),
                ("checkpoints", Some(ckpt)),
            ],
            &raw.reads(),
        )?;
        let s = i.args();
        let fo = FwdOut {
            out: o.as_slice_mut()?,
            token_major,
            last: l.as_slice_mut()?,
            ckpt: k.as_slice_mut()?,
        };
        let lv = level();
        Ok(py.detach(|| ssd::forward(lv, &s, fo))?)
    }
    let raw = Raw {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: &d,
        z: &z,
        dt_bias: &dt_bias,
        h0: &h0,
        seq_idx: &seq_idx,
        softplus,
        limit,
        dims,
        rows,
    };
    by_float!(
        is_f64(&x, "x")?,
        go(py, &raw, &out, &last, &ckpt, token_major)
    )
}

/// Backward from the forward's checkpoints: `dout (batch, heads, L, P)`, `dlast (batch,
/// heads, P, N)` or None; fills `dx`, `dz` `(batch, heads, L, P)`, `ddt (batch, heads,
/// L)`, `da`, `ddt_bias` `(heads,)`, `db`, `dc` like B, `dd` like D, `dh0` like the state
/// (`dd`, `dz`, `ddt_bias` exactly when D, z, dt_bias are given).
#[pyfunction]
#[pyo3(signature = (x, dt, a, b, c, d, z, dt_bias, seq_idx, softplus, limit, dims, rows, ckpt, dout, dlast,
                    dx, ddt, da, db, dc, dd, dz, ddt_bias, dh0))]
#[allow(clippy::too_many_arguments)]
fn ssd_bwd(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    dt: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    c: Bound<'_, PyAny>,
    d: Option<Bound<'_, PyAny>>,
    z: Option<Bound<'_, PyAny>>,
    dt_bias: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    softplus: bool,
    limit: Option<(f64, f64)>,
    dims: (usize, usize, usize, usize, usize, usize),
    rows: (usize, usize, usize, usize, usize),
    ckpt: Bound<'_, PyAny>,
    dout: Bound<'_, PyAny>,
    dlast: Option<Bound<'_, PyAny>>,
    dx: Bound<'_, PyAny>,
    ddt: Bound<'_, PyAny>,
    da: Bound<'_, PyAny>,
    db: Bound<'_, PyAny>,
    dc: Bound<'_, PyAny>,
    dd: Option<Bound<'_, PyAny>>,
    dz: Option<Bound<'_, PyAny>>,
    ddt_bias: Option<Bound<'_, PyAny>>,
    dh0: Bound<'_, PyAny>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        raw: &Raw<'_, '_>,
        ckpt: &Bound<'_, PyAny>,
        dout: &Bound<'_, PyAny>,
        dlast: Opt<'_, '_>,
        g: [&Bound<'_, PyAny>; 6],
        og: [Opt<'_, '_>; 3],
    ) -> Result<()> {
        let i = raw.borrow::<T>()?;
        let (k, go_, dl) = (
            ro::<T>(ckpt, "checkpoints")?,
            ro::<T>(dout, "dout")?,
            opt_ro::<T>(dlast, "dlast_state")?,
        );
        let mut dx = rw::<T>(g[0], "dx")?;
        let mut ddt = rw::<T>(g[1], "ddt")?;
        let mut da = rw::<T>(g[2], "dA")?;
        let mut db = rw::<T>(g[3], "dB")?;
        let mut dc = rw::<T>(g[4], "dC")?;
        let mut dh0 = rw::<T>(g[5], "dinitial_states")?;
        let mut dd = opt_rw::<T>(og[0], "dD")?;
        let mut dz = opt_rw::<T>(og[1], "dz")?;
        let mut dbias = opt_rw::<T>(og[2], "ddt_bias")?;
        let mut reads = raw.reads();
        reads.extend([
            ("checkpoints", Some(ckpt)),
            ("dout", Some(dout)),
            ("dlast_state", dlast.as_ref()),
        ]);
        disjoint(
            &[
                ("dx", Some(g[0])),
                ("ddt", Some(g[1])),
                ("dA", Some(g[2])),
                ("dB", Some(g[3])),
                ("dC", Some(g[4])),
                ("dinitial_states", Some(g[5])),
                ("dD", og[0].as_ref()),
                ("dz", og[1].as_ref()),
                ("ddt_bias", og[2].as_ref()),
            ],
            &reads,
        )?;
        let s = i.args();
        let o = BwdOut {
            dx: dx.as_slice_mut()?,
            ddt: ddt.as_slice_mut()?,
            da: da.as_slice_mut()?,
            db: db.as_slice_mut()?,
            dc: dc.as_slice_mut()?,
            dd: dd.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dz: dz.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            ddt_bias: dbias.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dh0: dh0.as_slice_mut()?,
        };
        if o.dd.is_some() != s.d.is_some() || o.ddt_bias.is_some() != s.dt_bias.is_some() {
            return Err(PyBmojoErr::value(
                "dD/ddt_bias: expected exactly when D/dt_bias are given",
            ));
        }
        let (ks, gs, dls) = (slice(&k), slice(&go_), dl.as_ref().map(slice));
        let lv = level();
        Ok(py.detach(|| ssd::backward(lv, &s, ks, gs, dls, o))?)
    }
    let raw = Raw {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: &d,
        z: &z,
        dt_bias: &dt_bias,
        h0: &None,
        seq_idx: &seq_idx,
        softplus,
        limit,
        dims,
        rows,
    };
    let grads = [&dx, &ddt, &da, &db, &dc, &dh0];
    let opt_grads = [&dd, &dz, &ddt_bias];
    by_float!(
        is_f64(&x, "x")?,
        go(py, &raw, &ckpt, &dout, &dlast, grads, opt_grads)
    )
}

/// One decoding step with one decay per head (Mamba-2's decode): `state (batch, heads, P,
/// N)` updated in place; `x`, `z` `(batch, heads, P)`; `dt` `(batch, heads)`; `a`,
/// `dt_bias` `(heads,)`; `b`, `c` `(batch, groups, N)`; `d` `(heads,)` or `(heads, P)`.
/// Every shape is checked exactly and everything is validated before `state` is written.
/// Returns the output `(batch, heads, P)`.
#[pyfunction]
#[pyo3(signature = (state, x, dt, a, b, c, d, z, dt_bias, softplus))]
#[allow(clippy::too_many_arguments)]
fn ssd_state_update<'py>(
    py: Python<'py>,
    state: Bound<'py, PyAny>,
    x: Bound<'py, PyAny>,
    dt: Bound<'py, PyAny>,
    a: Bound<'py, PyAny>,
    b: Bound<'py, PyAny>,
    c: Bound<'py, PyAny>,
    d: Option<Bound<'py, PyAny>>,
    z: Option<Bound<'py, PyAny>>,
    dt_bias: Option<Bound<'py, PyAny>>,
    softplus: bool,
) -> Result<Bound<'py, PyAny>> {
    #[allow(clippy::too_many_arguments)]
    fn go<'py, T: SimdElem + Element>(
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        dt: &Bound<'py, PyAny>,
        a: &Bound<'py, PyAny>,
        b: &Bound<'py, PyAny>,
        c: &Bound<'py, PyAny>,
        d: Opt<'_, 'py>,
        z: Opt<'_, 'py>,
        dt_bias: Opt<'_, 'py>,
        softplus: bool,
    ) -> Result<Bound<'py, PyAny>> {
        let sx = shape(x, "x", 3)?;
        let sb = shape(b, "B", 3)?;
        let (batch, heads, hdim, groups, n) = (sx[0], sx[1], sx[2], sb[1], sb[2]);
        let (rx, rdt, ra, rb, rc) = (
            ro::<T>(x, "x")?,
            ro::<T>(dt, "dt")?,
            ro::<T>(a, "A")?,
            ro::<T>(b, "B")?,
            ro::<T>(c, "C")?,
        );
        let (rd, rz, rbias) = (
            opt_ro::<T>(d, "D")?,
            opt_ro::<T>(z, "z")?,
            opt_ro::<T>(dt_bias, "dt_bias")?,
        );
        want("dt", rdt.shape(), &[batch, heads])?;
        want("A", ra.shape(), &[heads])?;
        want("B", rb.shape(), &[batch, groups, n])?;
        want("C", rc.shape(), &[batch, groups, n])?;
        if let Some(v) = &rd {
            if v.shape() != [heads] {
                want("D", v.shape(), &[heads, hdim])?;
            }
        }
        if let Some(v) = &rz {
            want("z", v.shape(), &sx)?;
        }
        if let Some(v) = &rbias {
            want("dt_bias", v.shape(), &[heads])?;
        }
        let mut rstate = rw::<T>(state, "state")?;
        want("state", rstate.shape(), &[batch, heads, hdim, n])?;
        let (out_any, _) = out_or_new::<T>(py, &None, &sx);
        let mut rout = rw::<T>(&out_any, "out")?;
        disjoint(
            &[("state", Some(state))],
            &[
                ("x", Some(x)),
                ("dt", Some(dt)),
                ("A", Some(a)),
                ("B", Some(b)),
                ("C", Some(c)),
                ("D", d.as_ref()),
                ("z", z.as_ref()),
                ("dt_bias", dt_bias.as_ref()),
            ],
        )?;
        let s = StepArgs {
            batch,
            heads,
            hdim,
            groups,
            dstate: n,
            x: slice(&rx),
            dt: slice(&rdt),
            a: slice(&ra),
            b: slice(&rb),
            c: slice(&rc),
            d: rd.as_ref().map(slice),
            z: rz.as_ref().map(slice),
            dt_bias: rbias.as_ref().map(slice),
            softplus,
        };
        let (st, o) = (rstate.as_slice_mut()?, rout.as_slice_mut()?);
        let lv = level();
        py.detach(|| ssd::state_update(lv, &s, st, o))?;
        drop(rout);
        Ok(out_any)
    }
    by_float!(
        is_f64(&state, "state")?,
        go(py, &state, &x, &dt, &a, &b, &c, &d, &z, &dt_bias, softplus)
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CHECKPOINT_CHUNK", ssd::CHUNK)?;
    m.add_function(wrap_pyfunction!(ssd_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(ssd_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(ssd_state_update, m)?)?;
    Ok(())
}
