//! The error a hook fails with. Its text becomes the failure reason the agent reports.

use std::fmt;

/// Why a hook failed. Any `std::error::Error` converts into it with `?`; build one from
/// text with [`HookError::new`] or [`bail!`](crate::bail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    reason: String,
}

/// The result a hook returns.
pub type Result<T, E = HookError> = std::result::Result<T, E>;

impl HookError {
    pub fn new(reason: impl Into<String>) -> Self {
        HookError {
            reason: reason.into(),
        }
    }

    /// The reason, as the agent will report it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HookError {
    fn from(e: E) -> Self {
        let mut reason = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        HookError { reason }
    }
}

/// Adds what was being done to an error: `fs::read(p).context("reading the model")?`.
pub trait ResultExt<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<HookError>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| HookError::new(format!("{what}: {}", e.into())))
    }
}

impl<T> ResultExt<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| HookError::new(what.to_string()))
    }
}

/// Returns early from a hook with a formatted failure reason.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::HookError::new(::std::format!($($arg)*)))
    };
}
