//! The fuzz targets use the module's pure core crate as any dependent does.

pub use ws_core::{flow, frame, inflate, lifecycle, observe, record};

pub mod support;
