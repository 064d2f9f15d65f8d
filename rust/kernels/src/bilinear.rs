//! Bilinear / time-varying dense affine recurrence, SPEC §5.
