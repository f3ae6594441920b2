//! Message rate limits (`ws_limit_zone`, `ws_limit`): nginx's `limit_req` leaky bucket, applied
//! to the data messages inside a tunnel.
//!
//! The arithmetic is `limit_req`'s, in its units: a rate in thousandths of a message per second,
//! a bucket's excess in thousandths of a message, time in milliseconds from nginx's clock. A
//! key's first message finds a new bucket (excess 0); every later one adds 1000 to the excess
//! after draining `rate * elapsed`; a message whose excess would exceed the burst is over the
//! limit. Where `limit_req` would refuse such a request (503), the default `ws_limit` delays
//! the message instead: it is accounted at once and forwarded when the bucket has drained to
//! the burst, so messages beyond the burst are spaced at the rate. With `nodelay` it is refused,
//! not accounted, as `limit_req` does.
//!
//! Pure: the time comes in as `now`; the buckets live wherever the glue keeps them (shared
//! memory), read and written under its lock.

/// Milliseconds (nginx's `ngx_msec_t` clock).
pub type Msec = u64;

/// One message in the bucket's unit.
pub const ONE: u64 = 1000;

/// A rate in thousandths of a message per second (`limit_req`'s unit), never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(u64);

impl Rate {
    /// Parses `rate=`'s value: `50r/s`, `600r/m` (a bare number is per second, as in
    /// `limit_req`). `None` for anything else, 0, or a rate too large to compute with.
    pub fn parse(text: &[u8]) -> Option<Rate> {
        let (digits, scale) = if let Some(d) = text.strip_suffix(b"r/s") {
            (d, 1)
        } else if let Some(d) = text.strip_suffix(b"r/m") {
            (d, 60)
        } else {
            (text, 1)
        };
        if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = core::str::from_utf8(digits).ok()?.parse().ok()?;
        let r = n * ONE / scale;
        (r > 0).then_some(Rate(r))
    }

    /// From thousandths of a message per second; `None` for 0.
    pub fn per_kilosecond(milli: u64) -> Option<Rate> {
        (milli > 0).then_some(Rate(milli))
    }

    /// Thousandths of a message per second.
    pub fn milli(self) -> u64 {
        self.0
    }

    /// How long the bucket takes to drain `excess`, in whole milliseconds (rounded down, as
    /// `limit_req`'s delay is).
    pub fn drain_time(self, excess: u64) -> Msec {
        excess.saturating_mul(1000) / self.0
    }
}

/// A key's state: `limit_req`'s node without the tree (excess, time of the last change).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a message above the rate.
    pub excess: u64,
    pub last: Msec,
}

/// What one limit says about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate or the burst: forward it now.
    Pass,
    /// Accounted; forward it this many milliseconds from now.
    Delay(Msec),
    /// Over the burst of a `nodelay` limit: not accounted, refused.
    Reject,
}

impl Verdict {
    /// Several limits apply: each must pass. Any refusal refuses; else the longest delay.
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Reject, _) | (_, Verdict::Reject) => Verdict::Reject,
            (Verdict::Delay(a), Verdict::Delay(b)) => Verdict::Delay(a.max(b)),
            (Verdict::Delay(d), Verdict::Pass) | (Verdict::Pass, Verdict::Delay(d)) => {
                Verdict::Delay(d)
            }
            (Verdict::Pass, Verdict::Pass) => Verdict::Pass,
        }
    }
}

/// One `ws_limit`: the zone's rate, its burst and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    /// Messages beyond the rate that pass at once.
    pub burst: u64,
    pub nodelay: bool,
}

impl Bucket {
    /// A key's first message: a new bucket, empty (the message is not counted, as in
    /// `limit_req`: the next one is measured from it).
    pub fn new(now: Msec) -> Bucket {
        Bucket {
            excess: 0,
            last: now,
        }
    }

    /// Milliseconds since the last change, as `limit_req` counts them: a clock that went back
    /// a little counts as no time, far back (over a minute) as one millisecond.
    fn elapsed(&self, now: Msec) -> u64 {
        let ms = now.wrapping_sub(self.last) as i64;
        if ms < -60_000 {
            1
        } else if ms < 0 {
            0
        } else {
            ms as u64
        }
    }

    /// The excess with one more message at `now`, and the elapsed milliseconds.
    fn with_one_more(&self, rate: Rate, now: Msec) -> (u64, u64) {
        let ms = self.elapsed(now);
        let drained = rate.0.saturating_mul(ms) / 1000;
        (self.excess.saturating_add(ONE).saturating_sub(drained), ms)
    }

    /// Whether the zone may drop this bucket to make room: unused for a minute and drained
    /// (`limit_req`'s test for its least recently used nodes).
    pub fn expired(&self, rate: Rate, now: Msec) -> bool {
        let ms = (now.wrapping_sub(self.last) as i64).unsigned_abs();
        ms >= 60_000 && rate.0.saturating_mul(ms) / 1000 >= self.excess
    }
}

impl Limit {
    fn burst_milli(&self) -> u64 {
        self.burst.saturating_mul(ONE)
    }

    /// What this limit would say about one more message, without accounting it.
    pub fn check(&self, b: &Bucket, now: Msec) -> Verdict {
        let (excess, _) = b.with_one_more(self.rate, now);
        self.verdict(excess)
    }

    /// Judges one more message and accounts it, unless it is refused.
    pub fn take(&self, b: &mut Bucket, now: Msec) -> Verdict {
        let (excess, ms) = b.with_one_more(self.rate, now);
        let v = self.verdict(excess);
        if v != Verdict::Reject {
            b.excess = excess;
            // As limit_req: the time moves only when some passed (what drained in less than a
            // millisecond is not lost).
            if ms > 0 {
                b.last = now;
            }
        }
        v
    }

    fn verdict(&self, excess: u64) -> Verdict {
        let burst = self.burst_milli();
        if excess <= burst {
            Verdict::Pass
        } else if self.nodelay {
            Verdict::Reject
        } else {
            match self.rate.drain_time(excess - burst) {
                0 => Verdict::Pass,
                d => Verdict::Delay(d),
            }
        }
    }

    /// The excess over the burst a message finds, for the error log (in thousandths).
    pub fn excess(&self, b: &Bucket, now: Msec) -> u64 {
        b.with_one_more(self.rate, now).0
    }
}

/// `$ws_limit_status`: the worst that happened to a tunnel, in `limit_req`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Passed,
    Delayed,
    Rejected,
    DelayedDryRun,
    RejectedDryRun,
}

impl Status {
    pub fn of(v: Verdict, dry_run: bool) -> Status {
        match (v, dry_run) {
            (Verdict::Pass, _) => Status::Passed,
            (Verdict::Delay(_), false) => Status::Delayed,
            (Verdict::Delay(_), true) => Status::DelayedDryRun,
            (Verdict::Reject, false) => Status::Rejected,
            (Verdict::Reject, true) => Status::RejectedDryRun,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passed => "PASSED",
            Status::Delayed => "DELAYED",
            Status::Rejected => "REJECTED",
            Status::DelayedDryRun => "DELAYED_DRY_RUN",
            Status::RejectedDryRun => "REJECTED_DRY_RUN",
        }
    }

    fn rank(self) -> u8 {
        match self {
            Status::Passed => 0,
            Status::DelayedDryRun => 1,
            Status::Delayed => 2,
            Status::RejectedDryRun => 3,
            Status::Rejected => 4,
        }
    }

    /// The worse of two.
    pub fn worst(self, other: Status) -> Status {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// nginx's log levels that `ws_limit_log_level` accepts (values of `NGX_LOG_*`).
pub const LOG_ERR: usize = 4;
pub const LOG_WARN: usize = 5;
pub const LOG_NOTICE: usize = 6;
pub const LOG_INFO: usize = 7;

/// Delays are logged one level below refusals, as `limit_req_log_level` does (`info` stays).
pub fn delay_log_level(level: usize) -> usize {
    if level >= LOG_INFO {
        LOG_INFO
    } else {
        level + 1
    }
}

/// `ws_limit_log_level`'s values.
pub fn parse_log_level(text: &[u8]) -> Option<usize> {
    match text {
        b"info" => Some(LOG_INFO),
        b"notice" => Some(LOG_NOTICE),
        b"warn" => Some(LOG_WARN),
        b"error" => Some(LOG_ERR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(rps: u64, burst: u64, nodelay: bool) -> Limit {
        Limit {
            rate: Rate::per_kilosecond(rps * 1000).unwrap(),
            burst,
            nodelay,
        }
    }

    #[test]
    fn rates_parse_like_limit_req() {
        assert_eq!(Rate::parse(b"20r/s"), Some(Rate(20_000)));
        assert_eq!(Rate::parse(b"600r/m"), Some(Rate(10_000)));
        assert_eq!(Rate::parse(b"1r/m"), Some(Rate(16)));
        assert_eq!(Rate::parse(b"5"), Some(Rate(5000)));
        for bad in [
            &b"0r/s"[..],
            b"r/s",
            b"-1r/s",
            b"1r/h",
            b"abc",
            b"",
            b"1.5r/s",
        ] {
            assert_eq!(Rate::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// 20r/s, burst=5, nodelay: limit_req passes the first request and five more at once,
    /// then refuses; 50 ms later one more passes.
    #[test]
    fn nodelay_is_limit_req_nodelay() {
        let l = limit(20, 5, true);
        let mut b = Bucket::new(0);
        for i in 0..5 {
            assert_eq!(l.take(&mut b, 0), Verdict::Pass, "message {}", i + 2);
        }
        assert_eq!(b.excess, 5000);
        assert_eq!(l.take(&mut b, 0), Verdict::Reject);
        assert_eq!(b.excess, 5000, "a refused message is not accounted");
        assert_eq!(l.take(&mut b, 49), Verdict::Reject);
        assert_eq!(l.take(&mut b, 50), Verdict::Pass);
        assert_eq!((b.excess, b.last), (5000, 50));
    }

    /// Shaping: after the burst, each message waits until the bucket drained to the burst, so
    /// a flood leaves at the rate.
    #[test]
    fn shaping_spaces_messages_at_the_rate() {
        let l = limit(20, 5, false);
        let mut b = Bucket::new(0);
        let delays: Vec<Verdict> = (0..9).map(|_| l.take(&mut b, 0)).collect();
        assert_eq!(&delays[..5], &[Verdict::Pass; 5]);
        assert_eq!(
            &delays[5..],
            &[
                Verdict::Delay(50),
                Verdict::Delay(100),
                Verdict::Delay(150),
                Verdict::Delay(200)
            ]
        );
        // The sender is held: one message at a time, each sent when its delay is over. The
        // first message makes the bucket.
        let mut b = Bucket::new(0);
        let mut now = 0;
        let mut sent = vec![0];
        for _ in 0..11 {
            if let Verdict::Delay(d) = l.take(&mut b, now) {
                now += d;
            }
            sent.push(now);
        }
        assert_eq!(&sent[..6], &[0; 6]);
        assert_eq!(&sent[6..], &[50, 100, 150, 200, 250, 300]);
    }

    #[test]
    fn no_burst_means_the_rate() {
        let l = limit(10, 0, false);
        let mut b = Bucket::new(1000);
        assert_eq!(l.take(&mut b, 1000), Verdict::Delay(100));
        assert_eq!(l.take(&mut b, 1100), Verdict::Delay(100));
        // A message a period after the last one passes; the bucket does not save up.
        assert_eq!(l.take(&mut b, 1300), Verdict::Pass);
        assert_eq!(b.excess, 0);
        assert_eq!(l.take(&mut b, 5000), Verdict::Pass);
        assert_eq!(l.take(&mut b, 5000), Verdict::Delay(100));
    }

    #[test]
    fn clock_going_back() {
        let l = limit(1, 0, true);
        let mut b = Bucket::new(100_000);
        // Back a little: no time passed.
        assert_eq!(l.check(&b, 99_000), Verdict::Reject);
        // Far back: one millisecond (limit_req), still nothing drained at 1r/s.
        assert_eq!(l.check(&b, 1_000), Verdict::Reject);
        assert_eq!(l.take(&mut b, 1_000), Verdict::Reject);
        assert_eq!(b, Bucket::new(100_000));
    }

    #[test]
    fn several_limits_combine() {
        use Verdict::*;
        assert_eq!(Pass.and(Delay(5)).and(Delay(3)), Delay(5));
        assert_eq!(Delay(5).and(Reject), Reject);
        assert_eq!(Pass.and(Pass), Pass);
    }

    #[test]
    fn status_is_the_worst() {
        let s = Status::Passed.worst(Status::Delayed).worst(Status::Passed);
        assert_eq!(s, Status::Delayed);
        assert_eq!(s.worst(Status::Rejected).as_str(), "REJECTED");
        assert_eq!(
            Status::of(Verdict::Delay(3), true).as_str(),
            "DELAYED_DRY_RUN"
        );
        assert_eq!(
            Status::of(Verdict::Reject, true).worst(Status::DelayedDryRun),
            Status::RejectedDryRun
        );
    }

    #[test]
    fn log_levels() {
        assert_eq!(delay_log_level(LOG_ERR), LOG_WARN);
        assert_eq!(delay_log_level(LOG_INFO), LOG_INFO);
        assert_eq!(parse_log_level(b"notice"), Some(LOG_NOTICE));
        assert_eq!(parse_log_level(b"debug"), None);
    }

    #[test]
    fn expiry_needs_a_minute_and_a_drained_bucket() {
        let r = Rate::parse(b"1r/s").unwrap();
        let b = Bucket {
            excess: 5000,
            last: 0,
        };
        assert!(!b.expired(r, 59_999));
        assert!(b.expired(r, 60_000));
        let b = Bucket {
            excess: 70_000,
            last: 0,
        };
        assert!(!b.expired(r, 60_000));
    }

    proptest! {
        /// Over any window, a shaped sender that always waits out its delay gets no more than
        /// burst + 1 + rate * window messages through; a nodelay one no more either; and a
        /// delay is never longer than the time to drain what is over the burst.
        #[test]
        fn never_more_than_burst_plus_rate(
            rps in 1u64..200, burst in 0u64..20, nodelay: bool,
            gaps in proptest::collection::vec(0u64..200, 1..200),
        ) {
            let l = limit(rps, burst, nodelay);
            let mut b = Bucket::new(0);
            let mut now = 0;
            let mut times = vec![0];
            for g in gaps {
                now += g;
                match l.take(&mut b, now) {
                    Verdict::Pass => times.push(now),
                    Verdict::Delay(d) => {
                        prop_assert!(!nodelay);
                        prop_assert!(d <= (b.excess - burst * ONE) * 1000 / l.rate.milli());
                        now += d;
                        times.push(now);
                    }
                    Verdict::Reject => prop_assert!(nodelay),
                }
                prop_assert!(nodelay || b.excess <= (burst + 1) * ONE + ONE);
            }
            // Every window [t, t + w]: at most burst + 1 + rate * w (+1 for rounding).
            for (i, &t) in times.iter().enumerate() {
                let n = times[i..].iter().take_while(|&&u| u <= t + 1000).count() as u64;
                prop_assert!(n <= burst + 2 + rps, "{n} messages in a second at {rps}r/s burst {burst}");
            }
        }

        /// A message that passes `check` passes `take` at the same moment, and `check` never
        /// changes the bucket.
        #[test]
        fn check_agrees_with_take(excess in 0u64..50_000, last in 0u64..10_000, now in 0u64..20_000, rps in 1u64..100, burst in 0u64..10, nodelay: bool) {
            let l = limit(rps, burst, nodelay);
            let b = Bucket { excess, last };
            let mut c = b;
            prop_assert_eq!(l.check(&b, now), l.take(&mut c, now));
        }
    }
}
