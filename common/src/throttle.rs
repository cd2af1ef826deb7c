//! `zfsync-send --bwlimit RATE`: one token bucket shared by every
//! connection of a run, taken from before each data frame goes out (after
//! compression: the bytes on the wire).
//!
//! The bucket lends: a frame takes its bytes at once and, when that leaves
//! the bucket in debt, waits until the debt is paid at the rate. Frames of
//! several connections queue that way in the order they asked, and the run
//! as a whole never exceeds the rate by more than the bucket's size
//! ([`Bucket::burst`]). Frames are made smaller on slow links
//! ([`Bucket::chunk`]) so that no connection waits long for its turn.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;

use crate::protocol::DATA_CHUNK;

/// The lowest rate accepted: 1 KiB per second.
pub const MIN_RATE: u64 = 1 << 10;
/// The smallest data frame a throttled sender writes.
const MIN_CHUNK: usize = 4 << 10;

/// Bytes per second, as given to `--bwlimit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

#[derive(Debug, Error, PartialEq, Eq)]
#[error("--bwlimit {given:?}: {why}; give bytes per second as a number with an optional K, M or G (powers of 1024), for example 500K, 10M or 1.5G")]
pub struct RateError {
    given: String,
    why: &'static str,
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let err = |why| RateError {
            given: s.to_string(),
            why,
        };
        let t = s.trim();
        let (num, unit) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
            _ => (t, ' '),
        };
        let mult: u64 = match unit {
            ' ' => 1,
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            _ => return Err(err("unknown unit (K, M or G)")),
        };
        if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(err("not a number"));
        }
        let n: f64 = num.parse().map_err(|_| err("not a number"))?;
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        let bytes = bytes as u64;
        if bytes < MIN_RATE {
            return Err(err("below the lowest rate, 1K"));
        }
        Ok(Rate(bytes))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, unit) = match self.0 {
            n if n >= 1 << 30 => (n as f64 / (1u64 << 30) as f64, "GiB"),
            n if n >= 1 << 20 => (n as f64 / (1u64 << 20) as f64, "MiB"),
            n => (n as f64 / 1024.0, "KiB"),
        };
        write!(f, "{n:.1} {unit}/s")
    }
}

/// The token bucket of a run.
#[derive(Debug)]
pub struct Bucket {
    rate: Rate,
    /// Tokens (bytes) the bucket holds at most.
    burst: f64,
    /// A std mutex: held only to do the sums, never across an `.await`.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Negative while frames wait for their bytes.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> Bucket {
        let burst = Self::burst_of(rate);
        Bucket {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    fn burst_of(rate: Rate) -> f64 {
        // Two frames (as [`Bucket::chunk`] sizes them at this rate), or
        // 50 ms at the rate: enough to ride out a sleep that wakes late,
        // small enough to keep the rate (a slow link is not sent minutes'
        // worth at once).
        let chunk = ((rate.0 / 4) as usize).clamp(MIN_CHUNK, DATA_CHUNK);
        (2.0 * chunk as f64).max(rate.0 as f64 / 20.0)
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The bytes that may go out at once before the rate holds.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    /// The data frame size for this rate: a quarter second's worth,
    /// between 4 KiB and the usual [`DATA_CHUNK`], so that connections
    /// take turns often and none waits anywhere near the receiver's idle
    /// timeout.
    pub fn chunk(&self) -> usize {
        ((self.rate.0 / 4) as usize).clamp(MIN_CHUNK, DATA_CHUNK)
    }

    /// Takes `n` bytes, waiting while the bucket is in debt.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let earned = now.duration_since(s.last).as_secs_f64() * self.rate.0 as f64;
            s.tokens = (s.tokens + earned).min(self.burst) - n as f64;
            s.last = now;
            (s.tokens < 0.0).then(|| Duration::from_secs_f64(-s.tokens / self.rate.0 as f64))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn rates_parse_with_units_and_bad_ones_name_the_fix() {
        for (s, want) in [
            ("10M", 10 << 20),
            ("500K", 500 << 10),
            ("500k", 500 << 10),
            ("1.5G", 3 << 29),
            ("2048", 2048),
            (" 64K ", 64 << 10),
            ("0.5M", 512 << 10),
        ] {
            assert_eq!(s.parse::<Rate>(), Ok(Rate(want)), "{s}");
        }
        for s in [
            "",
            "M",
            "ten",
            "10X",
            "10MB",
            "-5M",
            "1e3",
            "1.2.3K",
            "100",
            "0",
            "99999999999G",
        ] {
            let e = s.parse::<Rate>().unwrap_err().to_string();
            assert!(e.contains("for example 500K, 10M or 1.5G"), "{s}: {e}");
            assert!(e.starts_with(&format!("--bwlimit {s:?}")), "{e}");
        }
        assert!("100"
            .parse::<Rate>()
            .unwrap_err()
            .to_string()
            .contains("lowest rate"));
        assert_eq!(Rate(3 << 29).to_string(), "1.5 GiB/s");
        assert_eq!(Rate(500 << 10).to_string(), "500.0 KiB/s");
    }

    #[test]
    fn frames_shrink_on_slow_links() {
        assert_eq!(Bucket::new(Rate(10 << 20)).chunk(), DATA_CHUNK);
        assert_eq!(Bucket::new(Rate(100 << 10)).chunk(), 25 << 10);
        assert_eq!(Bucket::new(Rate(MIN_RATE)).chunk(), MIN_CHUNK);
        assert_eq!(Bucket::new(Rate(1 << 20)).burst(), 2 * DATA_CHUNK as u64);
        assert_eq!(Bucket::new(Rate(1 << 30)).burst(), (1 << 30) / 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_the_rate_after_its_burst() {
        let rate = 1u64 << 20;
        let b = Bucket::new(Rate(rate));
        let start = Instant::now();
        // The burst goes at once.
        b.take(b.burst() as usize).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Then 3 MiB take 3 s.
        for _ in 0..12 {
            b.take(256 << 10).await;
        }
        let t = start.elapsed().as_secs_f64();
        assert!((3.0..3.01).contains(&t), "{t}");
        // An idle bucket refills only up to its burst.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        b.take(b.burst() as usize + (1 << 20)).await;
        let t = start.elapsed().as_secs_f64();
        assert!((1.0..1.01).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn connections_share_one_bucket() {
        let rate = 512u64 << 10;
        let b = Arc::new(Bucket::new(Rate(rate)));
        b.take(b.burst() as usize).await;
        let start = Instant::now();
        // Four connections of 1 MiB each: 4 MiB at 512 KiB/s is 8 s for
        // the whole, however they interleave.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    for _ in 0..16 {
                        b.take(64 << 10).await;
                    }
                    Instant::now()
                })
            })
            .collect();
        let mut last = start;
        for t in tasks {
            last = last.max(t.await.unwrap());
        }
        let t = last.duration_since(start).as_secs_f64();
        assert!((8.0..8.05).contains(&t), "{t}");
    }
}
