//! Leveled logging into the hook's log. In a Wasm hook this goes to the agent, which keeps
//! the log with the deployment; natively (in unit tests) it goes to the [`TestHost`] that
//! runs the hook, or to stderr.
//!
//! [`TestHost`]: crate::testing::TestHost

/// How important a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes one line to the hook's log. The macros [`info!`](crate::info) and friends format
/// and call this.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::shoal::hooks::log as wit;
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:expr, $($arg:tt)*) => {
        $crate::log($level, &::std::format!($($arg)*))
    };
}

/// Logs at `trace` level, `format!` style.
#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::__log!($crate::Level::Trace, $($arg)*) }; }
/// Logs at `debug` level, `format!` style.
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::__log!($crate::Level::Debug, $($arg)*) }; }
/// Logs at `info` level, `format!` style.
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::__log!($crate::Level::Info, $($arg)*) }; }
/// Logs at `warn` level, `format!` style.
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::__log!($crate::Level::Warn, $($arg)*) }; }
/// Logs at `error` level, `format!` style.
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::__log!($crate::Level::Error, $($arg)*) }; }
