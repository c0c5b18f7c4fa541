//! softprompt: many soft-prompt classification tasks served from one frozen
//! transformer, with rows of different tasks batched into one forward pass.
//!
//! Layers, from the bottom: [`model`] (the frozen encoder), [`engine`] (the
//! mixed-task batched forward).

pub mod batch;
pub mod engine;
pub mod faults;
pub mod fsutil;
pub mod logging;
pub mod model;
pub mod profile;
pub mod registry;
pub mod server;
pub mod store;
pub mod task;
pub mod train;
pub mod workload;
