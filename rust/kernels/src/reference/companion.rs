//! Scalar f64 oracle: Companion (canonical) recurrence, SPEC §4.
