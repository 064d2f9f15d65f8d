//! Pools of per-row states (`state_batch_indices`, `conv_state_indices`): which slot of
//! the pool each batch row of a streaming update reads and writes.

use crate::error::{Error, Result};

/// The slot of each of `batch` rows in a pool of `slots_total` states: `indices[b]` (a
/// negative index is a padding row, `None`), or row `b` itself when there are no
/// `indices` (the pool must then hold one slot per row). `indices` (named `name`) must
/// hold `batch` entries; out-of-range and shared slots are errors, found before anything
/// is written. `pool` names the state array.
pub(crate) fn slot_rows(
    name: &str,
    pool: &str,
    indices: Option<&[i64]>,
    batch: usize,
    slots_total: usize,
) -> Result<Vec<Option<usize>>> {
    if indices.is_none() && slots_total != batch {
        return Err(Error::value(
            pool,
            format!("{batch} slots (one per batch row)"),
            slots_total,
        ));
    }
    let mut owner = vec![usize::MAX; slots_total];
    let mut slot_of = Vec::with_capacity(batch);
    for b in 0..batch {
        let sl = indices.map_or(b as i64, |x| x[b]);
        if sl < 0 {
            slot_of.push(None);
            continue;
        }
        let su = sl as usize;
        if su >= slots_total {
            return Err(Error::invalid(
                name,
                format!("entry {b} is {sl}, out of range for a state pool of {slots_total} slots"),
            ));
        }
        if owner[su] != usize::MAX {
            return Err(Error::invalid(
                name,
                format!("slot {sl} is used by rows {} and {b}", owner[su]),
            ));
        }
        owner[su] = b;
        slot_of.push(Some(su));
    }
    Ok(slot_of)
}
