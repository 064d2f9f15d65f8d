//! The kernels' one error type.
//!
//! Every check of the kernels names the argument at fault, so that the message read from
//! Python says which array or value to fix. A kernel validates everything before it
//! writes, so an `Err` means nothing was changed (the one exception, a NaN innovation score
//! found while the fused decode step runs, is documented there).

use std::fmt;

/// Why a kernel refused its arguments.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// `name` holds `got` elements where the declared sizes call for `expected`.
    Len {
        name: String,
        expected: usize,
        got: usize,
    },
    /// `name` has a value outside what the kernel accepts: `expected` describes the
    /// accepted values, `got` is the value received (when there is one worth showing).
    Value {
        name: String,
        expected: String,
        got: Option<String>,
    },
    /// `name` cannot be used, for `reason`: arguments that do not fit together (given
    /// without the one they need, two rows on one state slot), a value no kernel can
    /// consume (a NaN score, a count that would overflow).
    Invalid { name: String, reason: String },
    /// A state carried between calls (an eidetic store) breaks one of its invariants:
    /// it was corrupted or not made by these kernels. `name` is the array at fault.
    Corrupt { name: String, reason: String },
    /// An error found in one part of the input, with `context` (`row 3: `, `layers.1.`)
    /// written before it.
    Context { context: String, source: Box<Error> },
}

/// Result of a kernel call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A wrong element count.
    pub fn len(name: impl Into<String>, expected: usize, got: usize) -> Error {
        Error::Len {
            name: name.into(),
            expected,
            got,
        }
    }

    /// A value outside the accepted ones, shown with the value received.
    pub fn value(
        name: impl Into<String>,
        expected: impl Into<String>,
        got: impl fmt::Display,
    ) -> Error {
        Error::Value {
            name: name.into(),
            expected: expected.into(),
            got: Some(got.to_string()),
        }
    }

    /// A value outside the accepted ones, without the value (it says nothing more).
    pub fn expected(name: impl Into<String>, expected: impl Into<String>) -> Error {
        Error::Value {
            name: name.into(),
            expected: expected.into(),
            got: None,
        }
    }

    /// An argument that cannot be used, for the reason given.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// A state that breaks an invariant.
    pub fn corrupt(name: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// This error with `context` written before it (`"row 3: "`, `"layers.1."`).
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Len {
                name,
                expected,
                got,
            } => write!(f, "{name}: expected {expected} elements, got {got}"),
            Error::Value {
                name,
                expected,
                got: Some(got),
            } => write!(f, "{name}: expected {expected}, got {got}"),
            Error::Value {
                name,
                expected,
                got: None,
            } => write!(f, "{name}: expected {expected}"),
            Error::Invalid { name, reason } | Error::Corrupt { name, reason } => {
                write!(f, "{name}: {reason}")
            }
            Error::Context { context, source } => write!(f, "{context}{source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Context { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Checks `(name, got, expected)` element counts in order; the first mismatch is the
/// error. The one length check of the kernels.
pub fn check_lens(items: &[(&str, usize, usize)]) -> Result<()> {
    match items.iter().find(|(_, got, want)| got != want) {
        Some(&(name, got, expected)) => Err(Error::len(name, expected, got)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_argument() {
        assert_eq!(
            Error::len("u", 6, 5).to_string(),
            "u: expected 6 elements, got 5"
        );
        assert_eq!(
            Error::value("rate", "a value in (0, 1]", 2.0).to_string(),
            "rate: expected a value in (0, 1], got 2"
        );
        assert_eq!(
            Error::expected("capacity", ">= 1").to_string(),
            "capacity: expected >= 1"
        );
        let e = Error::corrupt("positions", "a position is held twice")
            .context("row 1: ")
            .context("layers.0.");
        assert_eq!(
            e.to_string(),
            "layers.0.row 1: positions: a position is held twice"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            check_lens(&[("a", 2, 2), ("b", 3, 4), ("c", 0, 1)]),
            Err(Error::len("b", 4, 3))
        );
        assert_eq!(check_lens(&[("a", 2, 2)]), Ok(()));
    }
}
