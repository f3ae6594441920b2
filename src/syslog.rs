//! `ws_log syslog:...`: each record as one syslog message, through nginx's own syslog code.
//!
//! nginx parses the `syslog:` parameters (`ngx_syslog_process_conf`, the same code and messages
//! as `access_log` and `error_log`), writes the RFC 3164 header (`ngx_syslog_add_header`) and
//! sends the datagram (`ngx_syslog_send`: one non-blocking UDP or unix datagram socket per
//! worker, opened at the first message, closed with the configuration). The message is the
//! record's JSON without the newline. A send that fails drops the record, counted like a
//! failed file write, said in the error log at most once a second.

use core::ptr::NonNull;

use ngx::ffi::{
    ngx_conf_t, ngx_pcalloc, ngx_syslog_add_header, ngx_syslog_peer_t, ngx_syslog_process_conf,
    NGX_LOG_ALERT,
};

use crate::error::ConfError;
use crate::log::{Clock, Losses};
use crate::record::{Line, TimeText};
use ws_core::status::Table;

/// Longest syslog header but for the host name and tag: `<255>Jan 01 00:00:00 `, the space
/// after the host name, and the `: ` after the tag.
const HEADER_FIXED: usize = "<255>Jan 01 00:00:00 ".len() + 1 + 2;

/// One `ws_log syslog:...` destination.
pub struct SyslogLog {
    /// nginx's peer, in the configuration pool, whose cleanup closes the socket.
    peer: NonNull<ngx_syslog_peer_t>,
    /// The `syslog:...` argument as written (nginx cuts its copy at the commas), for errors.
    name: String,
    /// The message being sent: header and record.
    msg: Vec<u8>,
    /// Scratch space for a record serialized once for several logs.
    line: Vec<u8>,
    clock: Clock,
    losses: Losses,
}

impl SyslogLog {
    /// Parses the `syslog:...` argument of the directive being parsed (`cf->args[1]`) with
    /// nginx's own parser, which reports its errors itself.
    ///
    /// # Safety
    /// `cf` must be the configuration being parsed, its first argument `syslog:...`.
    pub unsafe fn configure(cf: *mut ngx_conf_t, name: String) -> Result<SyslogLog, ConfError> {
        // SAFETY: cf->pool is the configuration pool; a zeroed peer is what nginx's callers
        // hand to ngx_syslog_process_conf.
        let peer = unsafe { ngx_pcalloc((*cf).pool, core::mem::size_of::<ngx_syslog_peer_t>()) };
        let peer = NonNull::new(peer.cast::<ngx_syslog_peer_t>()).ok_or(ConfError::NoMemory)?;
        // SAFETY: as above; nginx reads cf->args and fills the peer, logging what is wrong.
        if unsafe { ngx_syslog_process_conf(cf, peer.as_ptr()) } != ngx::core::NGX_CONF_OK {
            return Err(ConfError::Reported);
        }
        // Failed sends (nothing listening, a record too large for a datagram) are said by
        // our rate-limited line, not by nginx's for every record: nginx logs them at info
        // (EMSGSIZE not at all).
        // Before nginx 1.25.2 there is no EMSGSIZE level: failures are logged at info there.
        #[cfg(ngx_ws_ignore_emsgsize)]
        let level = ngx::ffi::ngx_connection_log_error_e_NGX_ERROR_IGNORE_EMSGSIZE;
        #[cfg(not(ngx_ws_ignore_emsgsize))]
        let level = ngx::ffi::ngx_connection_log_error_e_NGX_ERROR_INFO;
        // SAFETY: the peer was just set up by nginx; the socket is not open yet.
        unsafe { (*peer.as_ptr()).conn.set_log_error(level) };
        Ok(SyslogLog {
            peer,
            name,
            msg: Vec::new(),
            line: Vec::new(),
            clock: Clock::default(),
            losses: Losses::default(),
        })
    }

    pub fn now_text(&mut self) -> TimeText {
        self.clock.now_text()
    }

    pub fn count_drops_in(&mut self, table: Table) {
        self.losses.count_in(table);
    }

    /// Sends one record.
    pub fn write<T: Line>(&mut self, record: &T) {
        let mut msg = core::mem::take(&mut self.msg);
        let head = self.header(&mut msg);
        if record.write_line(&mut msg).is_ok() {
            self.send(&mut msg, head);
        } else {
            self.count_unwritable();
        }
        self.msg = msg;
    }

    /// Sends one record already serialized as a line.
    pub fn write_line(&mut self, line: &[u8]) {
        let mut msg = core::mem::take(&mut self.msg);
        let head = self.header(&mut msg);
        msg.extend_from_slice(line);
        self.send(&mut msg, head);
        self.msg = msg;
    }

    /// A record that could not be serialized is counted as dropped.
    pub fn count_unwritable(&mut self) {
        self.losses.count(1);
    }

    pub fn take_scratch(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.line)
    }

    pub fn give_scratch(&mut self, line: Vec<u8>) {
        self.line = line;
    }

    /// Puts nginx's syslog header into `msg` (emptied first); returns its length.
    fn header(&self, msg: &mut Vec<u8>) -> usize {
        // SAFETY: the peer lives in the configuration pool, as long as self; its host name
        // points at the cycle's.
        let (host, tag) = unsafe {
            let p = self.peer.as_ref();
            // Before nginx 1.23.4 the header names the cycle's host name.
            #[cfg(ngx_ws_syslog_peer_hostname)]
            let hostname = p.hostname;
            #[cfg(not(ngx_ws_syslog_peer_hostname))]
            let hostname = &raw const (*ngx::ffi::ngx_cycle).hostname;
            let host = if p.nohostname() != 0 || hostname.is_null() {
                0
            } else {
                (*hostname).len
            };
            (host, p.tag.len)
        };
        msg.clear();
        msg.reserve(HEADER_FIXED + host + tag);
        let start = msg.as_mut_ptr();
        // SAFETY: msg has room for the longest header nginx writes for this peer
        // (ngx_syslog_add_header writes exactly the parts counted above).
        let end = unsafe { ngx_syslog_add_header(self.peer.as_ptr(), start) };
        // SAFETY: nginx wrote `end - start` initialized bytes within the capacity.
        unsafe {
            let n = end.offset_from(start) as usize;
            msg.set_len(n);
            n
        }
    }

    /// Sends `msg` (header and line), without the line's newline.
    fn send(&mut self, msg: &mut Vec<u8>, head: usize) {
        if msg.last() == Some(&b'\n') {
            msg.pop();
        }
        if msg.len() <= head {
            return;
        }
        // SAFETY: the peer is nginx's, set up at configuration; nginx opens its socket in this
        // worker at the first send and only reads `msg`.
        let n =
            unsafe { ngx::ffi::ngx_syslog_send(self.peer.as_ptr(), msg.as_mut_ptr(), msg.len()) };
        if n == msg.len() as isize {
            return;
        }
        let err = (n < 0).then(std::io::Error::last_os_error);
        if !self.losses.count(1) {
            return;
        }
        let why = match err {
            Some(e) => {
                let text = e.to_string();
                let text = text
                    .split(" (os error")
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                format!("failed ({}: {text})", e.raw_os_error().unwrap_or(0))
            }
            None => "was incomplete".to_owned(),
        };
        let line = format!(
            "ws: send() to \"{}\" {why}, {} log records dropped so far",
            self.name, self.losses.dropped
        );
        let log = ngx::log::ngx_cycle_log().as_ptr();
        // SAFETY: the cycle log is valid in a running worker.
        unsafe { ngx::log::log_error(NGX_LOG_ALERT as _, log, 0, line.as_bytes()) };
    }
}
