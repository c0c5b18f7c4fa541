//! softprompt: many soft-prompt classification tasks served from one frozen
//! transformer, with rows of different tasks batched into one forward pass.
//!
//! Layers, from the bottom: [`model`] (the frozen encoder), [`engine`] (the
//! mixed-task batched forward).

pub mod engine;
pub mod logging;
pub mod model;
pub mod registry;
pub mod task;
pub mod train;
