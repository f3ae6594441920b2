//! `$ws_*` variables, filled from a finished tunnel (usable in `access_log`).

use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_http_variable_t, ngx_int_t,
    ngx_pnalloc, ngx_str_t, ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE,
};
use ngx::ngx_string;

use crate::tunnel::{self, Tunnel};

/// Which value a variable reads.
#[derive(Clone, Copy)]
enum Var {
    ClientFrames,
    UpstreamFrames,
    ClientMessages,
    UpstreamMessages,
    ClientBytes,
    UpstreamBytes,
    CloseCode,
    CloseReason,
    ClosedBy,
    End,
    Duration,
    Subprotocol,
}

const VARS: [(ngx_str_t, Var); 12] = [
    (ngx_string!("ws_client_frames"), Var::ClientFrames),
    (ngx_string!("ws_upstream_frames"), Var::UpstreamFrames),
    (ngx_string!("ws_client_messages"), Var::ClientMessages),
    (ngx_string!("ws_upstream_messages"), Var::UpstreamMessages),
    (ngx_string!("ws_client_bytes"), Var::ClientBytes),
    (ngx_string!("ws_upstream_bytes"), Var::UpstreamBytes),
    (ngx_string!("ws_close_code"), Var::CloseCode),
    (ngx_string!("ws_close_reason"), Var::CloseReason),
    (ngx_string!("ws_closed_by"), Var::ClosedBy),
    (ngx_string!("ws_end"), Var::End),
    (ngx_string!("ws_duration"), Var::Duration),
    (ngx_string!("ws_subprotocol"), Var::Subprotocol),
];

/// Registers the variables (preconfiguration).
///
/// # Safety
/// `cf` must be the http{} configuration being parsed.
pub unsafe fn add(cf: *mut ngx_conf_t) -> Status {
    for (i, (name, _)) in VARS.iter().enumerate() {
        let mut name = *name;
        // SAFETY: cf is valid; nginx copies the name into the configuration pool.
        let v: *mut ngx_http_variable_t =
            unsafe { ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as _) };
        // SAFETY: a non-null result is nginx's variable entry for us to fill.
        let Some(v) = (unsafe { v.as_mut() }) else {
            return Status::NGX_ERROR;
        };
        v.get_handler = Some(ngx_http_ws_variable);
        v.data = i;
    }
    // Cacheable: decided once per request (see gate.rs), read by proxy_pass and access_log.
    for (i, name) in [ngx_string!("ws_route"), ngx_string!("ws_upstream")]
        .into_iter()
        .enumerate()
    {
        let mut name = name;
        // SAFETY: cf is valid; nginx copies the name into the configuration pool.
        let v: *mut ngx_http_variable_t = unsafe { ngx_http_add_variable(cf, &mut name, 0) };
        // SAFETY: a non-null result is nginx's variable entry for us to fill.
        let Some(v) = (unsafe { v.as_mut() }) else {
            return Status::NGX_ERROR;
        };
        v.get_handler = Some(crate::gate::ngx_http_ws_route_variable);
        v.data = i;
    }
    Status::NGX_OK
}

/// The value of variable `which` for a finished tunnel, or `None` (not found).
fn value(t: &Tunnel, which: Var) -> Option<String> {
    let o = t.outcome?;
    Some(match which {
        Var::ClientFrames => t.client().frames.to_string(),
        Var::UpstreamFrames => t.upstream().frames.to_string(),
        Var::ClientMessages => t.client().messages.to_string(),
        Var::UpstreamMessages => t.upstream().messages.to_string(),
        Var::ClientBytes => t.client().bytes.to_string(),
        Var::UpstreamBytes => t.upstream().bytes.to_string(),
        Var::CloseCode => t.close_code_reason().0?.to_string(),
        Var::CloseReason => t.close_code_reason().1?.to_string(),
        Var::ClosedBy => o.closed_by.as_str().to_string(),
        Var::End => o.end.as_str().to_string(),
        Var::Duration => format!("{}.{:03}", o.duration_ms / 1000, o.duration_ms % 1000),
        Var::Subprotocol => t.subprotocol.clone()?,
    })
}

unsafe extern "C" fn ngx_http_ws_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live request and a value slot to fill.
    let (request, v) = unsafe { (crate::http::request(&*r), &mut *v) };
    let found = VARS
        .get(data)
        .and_then(|(_, which)| tunnel::of_request(request).and_then(|t| value(t, *which)));
    let Some(s) = found else {
        v.set_not_found(1);
        return Status::NGX_OK.into();
    };
    // SAFETY: allocating from the live request's pool.
    let p = unsafe { ngx_pnalloc((*r).pool, s.len()) }.cast::<u8>();
    if p.is_null() {
        return Status::NGX_ERROR.into();
    }
    // SAFETY: p has room for s.len() bytes.
    unsafe { core::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len()) };
    v.data = p;
    v.set_len(s.len() as u32);
    v.set_valid(1);
    v.set_no_cacheable(0);
    v.set_not_found(0);
    Status::NGX_OK.into()
}
