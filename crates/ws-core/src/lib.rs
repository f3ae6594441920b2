//! nginx-ws's pure core: everything the module decides that does not need nginx.
//!
//! The frame parser ([`frame`]), the per-direction observer ([`observe`]), the proxy's shaping
//! of a direction ([`flow`]), log records ([`record`]), the request rules of `ws_route`,
//! `ws_allow_origin` and `ws_handshake` ([`route`]), the cross-worker metrics table
//! ([`status`]), the lifecycle of a tunnel (deadlines, close handshake, end causes:
//! [`lifecycle`]) and the message rate limits' leaky bucket ([`limit`]). No nginx types: unit,
//! property and fuzz tested, benchmarked. The module crate is the nginx glue around it.

pub mod flow;
pub mod frame;
pub mod inflate;
pub mod lifecycle;
pub mod limit;
pub mod observe;
pub mod record;
pub mod route;
pub mod status;
