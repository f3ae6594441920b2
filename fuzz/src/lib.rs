//! The module's pure Rust parts, for fuzzing (same files as the module builds).

#[path = "../../src/flow.rs"]
pub mod flow;
#[path = "../../src/frame.rs"]
pub mod frame;
#[path = "../../src/observe.rs"]
pub mod observe;
#[path = "../../src/record.rs"]
pub mod record;
