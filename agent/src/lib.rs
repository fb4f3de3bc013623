//! The Shoal agent: every host runs it; together the agents deploy applications across the
//! fleet with no central server. See ARCHITECTURE.md for the codemap.

pub mod api;
pub mod appspec;
pub mod beneath;
pub mod blobs;
pub mod bundle;
pub mod chunks;
pub mod cli;
pub mod config;
pub mod durable;
pub mod faults;
pub mod fleet;
pub mod hooks;
pub mod http;
pub mod identity;
pub mod lifecycle;
pub mod logs;
pub mod mesh;
pub mod switch;
