//! Helpers over nginx's request structures, used by the gate, the tunnel and the status
//! handler: header lookup, the upgrade test, indexed variables and socket addresses.
//!
//! Each exists once. The request checks and the tunnel's attach once used two copies of the
//! header lookup and of the "is this a WebSocket upgrade" test that disagreed (one looked at
//! every `Upgrade` field, the other only at the first), and a second `Upgrade` field turned the
//! module off for a tunnel.

use core::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use ngx::ffi::{
    ngx_http_get_indexed_variable, ngx_http_request_t, ngx_int_t, ngx_list_t, ngx_str_t,
    ngx_table_elt_t, ngx_uint_t, sockaddr, socklen_t,
};

use ngx::http::Request;

use crate::route::{self, Upgrade};

/// The request as `ngx`'s [`Request`], by shared reference: its methods only read, and a
/// shared reference may live beside other shared ones (`Request::from_ngx_http_request` gives
/// a `&mut`, which must never coexist with another reference to the request).
pub fn request(r: &ngx_http_request_t) -> &Request {
    // SAFETY: Request is a #[repr(transparent)] wrapper of ngx_http_request_t.
    unsafe { &*core::ptr::from_ref(r).cast::<Request>() }
}

/// Values of the headers called `name` (ASCII case-insensitive) in a headers list, in order;
/// entries removed by a filter (hash 0) are skipped.
pub fn header_values<'a>(list: &'a ngx_list_t, name: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut part = &list.part;
    loop {
        let elts = part.elts.cast::<ngx_table_elt_t>();
        for i in 0..part.nelts {
            // SAFETY: a request's headers list holds `nelts` ngx_table_elt_t per part.
            let h = unsafe { &*elts.add(i) };
            if h.hash != 0 && h.key.as_bytes().eq_ignore_ascii_case(name) {
                out.push(h.value.as_bytes());
            }
        }
        // SAFETY: `next` is null or the next part of the same list.
        match unsafe { part.next.as_ref() } {
            Some(next) => part = next,
            None => return out,
        }
    }
}

/// The first value of the header `name`, as text.
pub fn find_header(list: &ngx_list_t, name: &[u8]) -> Option<String> {
    header_values(list, name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// What the request's `Upgrade` fields ask for. Every request that has one is an upgrade
/// attempt: nginx tunnels it if the upstream answers 101, whatever the field says.
pub fn upgrade_offer(r: &ngx_http_request_t) -> Upgrade {
    route::upgrade_offer(&header_values(&r.headers_in.headers, b"upgrade"))
}

/// Whether the 101 about to be sent starts a WebSocket tunnel: the request is an upgrade
/// attempt and the upstream did not switch to some other protocol (see
/// [`route::switched_to_websocket`]). The one test the gate and the tunnel share.
pub fn is_websocket_101(r: &ngx_http_request_t) -> bool {
    if upgrade_offer(r) == Upgrade::None {
        return false;
    }
    let out = &r.headers_out.headers;
    let accept = !header_values(out, b"sec-websocket-accept").is_empty();
    route::switched_to_websocket(&header_values(out, b"upgrade"), accept)
}

/// The value of an indexed variable, when found.
///
/// # Safety
/// `r` must be a live request and `index` an index obtained for this cycle's configuration
/// (or negative: none). The bytes live in the request pool or in configuration memory.
pub unsafe fn indexed<'a>(r: *mut ngx_http_request_t, index: ngx_int_t) -> Option<&'a [u8]> {
    let index = ngx_uint_t::try_from(index).ok()?;
    // SAFETY: per the contract; nginx returns null or a value in request or conf memory.
    let v = unsafe { ngx_http_get_indexed_variable(r, index).as_ref()? };
    if v.not_found() != 0 || v.valid() == 0 {
        return None;
    }
    if v.len() == 0 {
        return Some(&[]);
    }
    // SAFETY: a valid value has `len` bytes at `data`.
    Some(unsafe { core::slice::from_raw_parts(v.data, v.len() as usize) })
}

/// `$ws_route` and `$ws_upstream` of a request (`route` and `upstream` are their variable
/// indices), for the tunnel's `open` record and metric labels.
///
/// # Safety
/// As [`indexed`].
pub unsafe fn chosen(
    r: *mut ngx_http_request_t,
    route: ngx_int_t,
    upstream: ngx_int_t,
) -> Option<(String, String)> {
    // SAFETY: per the contract.
    let get = |idx| unsafe { indexed(r, idx) }.map(|b| String::from_utf8_lossy(b).into_owned());
    Some((get(route)?, get(upstream)?))
}

/// `$request_id` of a request (`index` is its variable index), borrowed from the request pool
/// where nginx keeps it.
///
/// # Safety
/// As [`indexed`]; callers must not keep the text beyond the request pool (a tunnel is dropped
/// by a cleanup of that pool, before its memory is freed).
pub unsafe fn request_id<'a>(r: *mut ngx_http_request_t, index: ngx_int_t) -> Option<&'a str> {
    // SAFETY: per the contract.
    let b = unsafe { indexed(r, index) }?;
    // nginx's $request_id is 32 hex digits.
    core::str::from_utf8(b).ok()
}

/// An nginx string as owned text, `None` when empty.
pub fn non_empty(s: &ngx_str_t) -> Option<String> {
    if s.len == 0 || s.data.is_null() {
        None
    } else {
        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
    }
}

/// `address:port` of a socket address (`[v6]:port` for IPv6).
pub fn addr_text(sa: *mut sockaddr, len: socklen_t) -> Option<String> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: nginx's sockaddr pointers are valid for `len` bytes; the family says which type.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                let s = &*sa.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(s.sin_port))).to_string())
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
                let s = &*sa.cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(s.sin6_addr.s6_addr);
                let a = SocketAddrV6::new(ip, u16::from_be(s.sin6_port), 0, s.sin6_scope_id);
                Some(SocketAddr::V6(a).to_string())
            }
            libc::AF_UNIX => Some("unix:".to_string()),
            _ => None,
        }
    }
}
