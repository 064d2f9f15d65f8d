//! Companion (canonical) recurrence, SPEC §4.
