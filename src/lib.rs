pub mod frame;
pub mod observe;
