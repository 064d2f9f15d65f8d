//! Scalar f64 oracle: Bilinear / time-varying dense affine recurrence, SPEC §5.
