//! `bmojo_core._core.eidetic`: eidetic token retention, design §6.1 (innovation scores) and
//! §6.2 (the bounded store, streaming push and chunked builder).
//!
//! Every shape is checked here (the kernels check lengths and the store's invariants), so
//! a wrong call raises instead of misreading a layout; `push` validates everything before
//! it writes.

use bmojo_kernels::eidetic::{self, InnovArgs, InnovOut, Policy, SelectArgs, SelectOut};
use bmojo_kernels::SimdElem;
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::args::{by_float, disjoint, is_f64, ro, rw, slice, want};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

/// `name` must have `n` dimensions (`what` describes them).
fn dims(name: &str, got: &[usize], n: usize, what: &str) -> Result<()> {
    if got.len() == n {
        Ok(())
    } else {
        Err(PyBmojoErr::value(format!(
            "{name}: expected shape {what}, got {got:?}"
        )))
    }
}

/// `innovation_scores(y, weights, history, count, ema, chi2, rate, floor, scores,
/// history_out, count_out, ema_out)`: y `(B, L, d)`, weights `(k,)`, history(_out)
/// `(B, k, d)`, count(_out) `(B,)` int64, ema(_out) `(B, 2)`, scores `(B, L)`.
#[pyfunction]
#[pyo3(signature = (y, weights, history, count, ema, chi2, rate, floor, scores, history_out, count_out, ema_out))]
#[allow(clippy::too_many_arguments)]
fn innovation_scores(
    py: Python<'_>,
    y: Bound<'_, PyAny>,
    weights: Bound<'_, PyAny>,
    history: Bound<'_, PyAny>,
    count: Bound<'_, PyAny>,
    ema: Bound<'_, PyAny>,
    chi2: bool,
    rate: f64,
    floor: f64,
    scores: Bound<'_, PyAny>,
    history_out: Bound<'_, PyAny>,
    count_out: Bound<'_, PyAny>,
    ema_out: Bound<'_, PyAny>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        y: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        history: &Bound<'_, PyAny>,
        count: &Bound<'_, PyAny>,
        ema: &Bound<'_, PyAny>,
        chi2: bool,
        rate: f64,
        floor: f64,
        scores: &Bound<'_, PyAny>,
        history_out: &Bound<'_, PyAny>,
        count_out: &Bound<'_, PyAny>,
        ema_out: &Bound<'_, PyAny>,
    ) -> Result<()> {
        let ry = ro::<T>(y, "y")?;
        dims("y", ry.shape(), 3, "(batch, len, dim)")?;
        let (b, l, d) = (ry.shape()[0], ry.shape()[1], ry.shape()[2]);
        let rwt = ro::<T>(weights, "weights")?;
        dims("weights", rwt.shape(), 1, "(taps,)")?;
        let k = rwt.shape()[0];
        let rh = ro::<T>(history, "history")?;
        want("history", rh.shape(), &[b, k, d])?;
        let rc = ro::<i64>(count, "count")?;
        want("count", rc.shape(), &[b])?;
        let re = ro::<T>(ema, "ema")?;
        want("ema", re.shape(), &[b, 2])?;
        let mut ws = rw::<T>(scores, "scores")?;
        want("scores", ws.shape(), &[b, l])?;
        let mut wh = rw::<T>(history_out, "history_out")?;
        want("history_out", wh.shape(), &[b, k, d])?;
        let mut wc = rw::<i64>(count_out, "count_out")?;
        want("count_out", wc.shape(), &[b])?;
        let mut we = rw::<T>(ema_out, "ema_out")?;
        want("ema_out", we.shape(), &[b, 2])?;
        let s = InnovArgs {
            batch: b,
            len: l,
            dim: d,
            weights: slice(&rwt),
            y: slice(&ry),
            history: slice(&rh),
            count: slice(&rc),
            ema: slice(&re),
            chi2,
            rate: T::from_f64(rate),
            floor: T::from_f64(floor),
        };
        let out = InnovOut {
            scores: ws.as_slice_mut()?,
            history: wh.as_slice_mut()?,
            count: wc.as_slice_mut()?,
            ema: we.as_slice_mut()?,
        };
        let lv = level();
        Ok(py.detach(|| eidetic::innovation(lv, &s, out))?)
    }
    by_float!(
        is_f64(&y, "y")?,
        go(
            py,
            &y,
            &weights,
            &history,
            &count,
            &ema,
            chi2,
            rate,
            floor,
            &scores,
            &history_out,
            &count_out,
            &ema_out,
        )
    )
}

fn policy(name: &str, threshold: f64) -> Result<Policy> {
    Ok(Policy::from_name(name, threshold)?)
}

/// `push(positions, scores, count, new_scores, policy, threshold)`: the store
/// `positions (B, m)` int64, `scores (B, m)` float64, `count (B,)` int64, updated in place
/// with `new_scores (B, T)` float64 (nothing is written when a check fails).
#[pyfunction]
#[pyo3(signature = (positions, scores, count, new_scores, policy, threshold))]
fn push(
    py: Python<'_>,
    positions: Bound<'_, PyAny>,
    scores: Bound<'_, PyAny>,
    count: Bound<'_, PyAny>,
    new_scores: Bound<'_, PyAny>,
    policy: &str,
    threshold: f64,
) -> Result<()> {
    let pol = self::policy(policy, threshold)?;
    let mut wp = rw::<i64>(&positions, "positions")?;
    dims("positions", wp.shape(), 2, "(batch, capacity)")?;
    let (b, m) = (wp.shape()[0], wp.shape()[1]);
    let mut ws = rw::<f64>(&scores, "scores")?;
    want("scores", ws.shape(), &[b, m])?;
    let mut wc = rw::<i64>(&count, "count")?;
    want("count", wc.shape(), &[b])?;
    let rn = ro::<f64>(&new_scores, "new_scores")?;
    dims("new_scores", rn.shape(), 2, "(batch, T)")?;
    want("new_scores", &rn.shape()[..1], &[b])?;
    disjoint(
        &[
            ("positions", Some(&positions)),
            ("scores", Some(&scores)),
            ("count", Some(&count)),
        ],
        &[("new_scores", Some(&new_scores))],
    )?;
    let (p, s, c, n) = (
        wp.as_slice_mut()?,
        ws.as_slice_mut()?,
        wc.as_slice_mut()?,
        slice(&rn),
    );
    Ok(py.detach(|| eidetic::push(pol, b, m, p, s, c, n))?)
}

/// `check(positions, scores, count, policy, threshold)`: raises BmojoValueError when the
/// store breaks an invariant (see the kernel's `check_store`).
#[pyfunction]
#[pyo3(signature = (positions, scores, count, policy, threshold))]
fn check(
    py: Python<'_>,
    positions: Bound<'_, PyAny>,
    scores: Bound<'_, PyAny>,
    count: Bound<'_, PyAny>,
    policy: &str,
    threshold: f64,
) -> Result<()> {
    let pol = self::policy(policy, threshold)?;
    let rp = ro::<i64>(&positions, "positions")?;
    dims("positions", rp.shape(), 2, "(batch, capacity)")?;
    let (b, m) = (rp.shape()[0], rp.shape()[1]);
    let rs = ro::<f64>(&scores, "scores")?;
    want("scores", rs.shape(), &[b, m])?;
    let rc = ro::<i64>(&count, "count")?;
    want("count", rc.shape(), &[b])?;
    let (p, s, c) = (slice(&rp), slice(&rs), slice(&rc));
    Ok(py.detach(|| eidetic::check_store(pol, b, m, p, s, c))?)
}

/// `select(scores, positions, store_scores, start, chunk, policy, threshold, held,
/// positions_out, scores_out, count_out)`: scores `(B, L)` float64, the store before the
/// first position `positions (B, m)` int64 / `store_scores (B, m)` float64 / `start (B,)`
/// int64, `held (B, ceil(L/chunk), m)` int64 and the store after the last position.
#[pyfunction]
#[pyo3(signature = (scores, positions, store_scores, start, chunk, policy, threshold, held, positions_out, scores_out, count_out))]
#[allow(clippy::too_many_arguments)]
fn select(
    py: Python<'_>,
    scores: Bound<'_, PyAny>,
    positions: Bound<'_, PyAny>,
    store_scores: Bound<'_, PyAny>,
    start: Bound<'_, PyAny>,
    chunk: usize,
    policy: &str,
    threshold: f64,
    held: Bound<'_, PyAny>,
    positions_out: Bound<'_, PyAny>,
    scores_out: Bound<'_, PyAny>,
    count_out: Bound<'_, PyAny>,
) -> Result<()> {
    let pol = self::policy(policy, threshold)?;
    if chunk == 0 {
        return Err(PyBmojoErr::value("chunk: expected >= 1, got 0"));
    }
    let rs = ro::<f64>(&scores, "scores")?;
    dims("scores", rs.shape(), 2, "(batch, len)")?;
    let (b, l) = (rs.shape()[0], rs.shape()[1]);
    let rp = ro::<i64>(&positions, "positions")?;
    dims("positions", rp.shape(), 2, "(batch, capacity)")?;
    let m = rp.shape()[1];
    want("positions", rp.shape(), &[b, m])?;
    let rss = ro::<f64>(&store_scores, "store_scores")?;
    want("store_scores", rss.shape(), &[b, m])?;
    let rst = ro::<i64>(&start, "start")?;
    want("start", rst.shape(), &[b])?;
    let mut wh = rw::<i64>(&held, "held")?;
    want("held", wh.shape(), &[b, l.div_ceil(chunk), m])?;
    let mut wp = rw::<i64>(&positions_out, "positions_out")?;
    want("positions_out", wp.shape(), &[b, m])?;
    let mut ws = rw::<f64>(&scores_out, "scores_out")?;
    want("scores_out", ws.shape(), &[b, m])?;
    let mut wc = rw::<i64>(&count_out, "count_out")?;
    want("count_out", wc.shape(), &[b])?;
    let s = SelectArgs {
        policy: pol,
        batch: b,
        len: l,
        cap: m,
        chunk,
        scores: slice(&rs),
        positions: slice(&rp),
        store_scores: slice(&rss),
        start: slice(&rst),
    };
    let out = SelectOut {
        held: wh.as_slice_mut()?,
        positions: wp.as_slice_mut()?,
        scores: ws.as_slice_mut()?,
        count: wc.as_slice_mut()?,
    };
    Ok(py.detach(|| eidetic::select(&s, out))?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(innovation_scores, m)?)?;
    m.add_function(wrap_pyfunction!(push, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(select, m)?)?;
    Ok(())
}
