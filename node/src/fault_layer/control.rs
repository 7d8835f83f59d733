//! The fault settings a test writes into the control file, and the pure decision of what
//! happens to one outgoing datagram. No I/O here: the socket and the disk hook ask.
//!
//! The file holds `key=value` words separated by spaces or newlines; `#` starts a comment; an
//! empty file is no faults:
//!
//! ```text
//! delay=40ms jitter=20ms reorder=10% duplicate=5%
//! fsync_delay=200ms write_delay=20ms
//! clock_offset=-45m
//! ```

use std::time::Duration;

/// Longest delay or jitter accepted: longer than any timeout of the mesh, so a larger value is
/// a typo, not a test.
pub const DELAY_MAX: Duration = Duration::from_secs(60);

/// Largest clock jump accepted, either way: past the longest certificate validity (the CA's 10
/// years), so every certificate question can be asked, and far from where `SystemTime`
/// arithmetic could overflow.
pub const CLOCK_OFFSET_MAX: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);

/// Largest control file read (a few words are expected).
pub const CONTROL_BYTES_MAX: usize = 4 * 1024;

/// The extra hold of a datagram chosen to be reordered: this long after its own delay, so the
/// datagrams sent just after it overtake it.
pub const REORDER_HOLD: Duration = Duration::from_millis(20);

/// What the control file asks for. The default is no faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultSettings {
    /// Every outgoing datagram waits this long.
    pub delay: Duration,
    /// Plus a uniform random extra up to this (so datagrams also reorder among themselves).
    pub jitter: Duration,
    /// Percent of datagrams held back [`REORDER_HOLD`] longer, so later ones overtake them.
    pub reorder_percent: u8,
    /// Percent of datagrams sent twice (each copy with its own delay).
    pub duplicate_percent: u8,
    /// Every fsync of the store waits this long first (a slow disk).
    pub fsync_delay: Duration,
    /// Every write of the store waits this long first.
    pub write_delay: Duration,
    /// The wall clock reads this many ms ahead (negative: behind) of the system clock: a clock
    /// jump, for konord's stamps and certificate checks (`crate::wall_clock`).
    pub clock_offset_ms: i64,
}

/// A control file that cannot be used. The layer keeps its settings when a new file is bad.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// A word without `=`.
    #[error("{word:?} is not key=value")]
    NotKeyValue {
        /// The word.
        word: String,
    },
    /// A key the layer does not know.
    #[error(
        "unknown fault setting {key:?} (known: delay, jitter, reorder, duplicate, fsync_delay, write_delay, clock_offset)"
    )]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A value that does not parse, or is out of range.
    #[error("{key}={value:?}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A key given twice.
    #[error("{key} is given twice")]
    Repeated {
        /// The key.
        key: String,
    },
    /// More than [`CONTROL_BYTES_MAX`] bytes.
    #[error("the control file has {bytes} bytes, more than {max}", max = CONTROL_BYTES_MAX)]
    TooLarge {
        /// Its length.
        bytes: usize,
    },
}

impl FaultSettings {
    /// Reads a control file's text. All or nothing: any bad word fails the whole text.
    pub fn parse(text: &str) -> Result<FaultSettings, ControlError> {
        if text.len() > CONTROL_BYTES_MAX {
            return Err(ControlError::TooLarge { bytes: text.len() });
        }
        let mut settings = FaultSettings::default();
        let mut seen: Vec<&str> = Vec::new();
        let words = text.lines().flat_map(|line| line.split('#').next().unwrap_or("").split_whitespace());
        for word in words {
            let (key, value) =
                word.split_once('=').ok_or_else(|| ControlError::NotKeyValue { word: word.to_owned() })?;
            if seen.contains(&key) {
                return Err(ControlError::Repeated { key: key.to_owned() });
            }
            seen.push(key);
            match key {
                "delay" => settings.delay = duration(key, value)?,
                "jitter" => settings.jitter = duration(key, value)?,
                "reorder" => settings.reorder_percent = percent(key, value)?,
                "duplicate" => settings.duplicate_percent = percent(key, value)?,
                "fsync_delay" => settings.fsync_delay = duration(key, value)?,
                "write_delay" => settings.write_delay = duration(key, value)?,
                "clock_offset" => settings.clock_offset_ms = clock_offset(key, value)?,
                _ => return Err(ControlError::UnknownKey { key: key.to_owned() }),
            }
        }
        Ok(settings)
    }

    /// Whether outgoing datagrams are touched at all.
    pub fn touches_network(&self) -> bool {
        !self.delay.is_zero() || !self.jitter.is_zero() || self.reorder_percent > 0 || self.duplicate_percent > 0
    }

    /// When each copy of one outgoing datagram leaves, after now: once normally, twice for a
    /// duplicate. The plan drops nothing (loss is nftables' job); a delayed copy is lost only
    /// if the send buffer is full when its time comes, as a full router queue would lose it.
    /// `draws` supplies uniform random numbers in `0..1`.
    pub fn plan_send(&self, mut draws: impl FnMut() -> f64) -> SendPlan {
        let first = self.copy_wait(&mut draws);
        let second = if chance(self.duplicate_percent, draws()) { Some(self.copy_wait(&mut draws)) } else { None };
        SendPlan { first, second }
    }
}

impl FaultSettings {
    fn copy_wait(&self, draws: &mut impl FnMut() -> f64) -> Duration {
        let mut wait = self.delay + self.jitter.mul_f64(draws());
        if chance(self.reorder_percent, draws()) {
            wait += REORDER_HOLD;
        }
        wait
    }
}

/// When the copies of a datagram leave, from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPlan {
    /// The datagram.
    pub first: Duration,
    /// Its duplicate, if it gets one.
    pub second: Option<Duration>,
}

fn chance(percent: u8, draw: f64) -> bool {
    draw * 100.0 < f64::from(percent)
}

fn duration(key: &str, value: &str) -> Result<Duration, ControlError> {
    let bad = bad_value(key, value);
    let (number, unit) = match value.strip_suffix("ms") {
        Some(number) => (number, Duration::from_millis(1)),
        None => match value.strip_suffix('s') {
            Some(number) => (number, Duration::from_secs(1)),
            None => return Err(bad("give a unit: 40ms or 2s")),
        },
    };
    let count: u32 = number.parse().map_err(|_| bad("not a whole number"))?;
    let total = unit * count;
    if total > DELAY_MAX {
        return Err(bad(&format!("more than {} s", DELAY_MAX.as_secs())));
    }
    Ok(total)
}

/// A signed span: `+90s`, `-45m`, `3d`; units ms, s, m, h, d.
fn clock_offset(key: &str, value: &str) -> Result<i64, ControlError> {
    let bad = bad_value(key, value);
    let (negative, unsigned) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value.strip_prefix('+').unwrap_or(value)),
    };
    let units: [(&str, u64); 5] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];
    let (number, unit_ms) = units
        .iter()
        .find_map(|(suffix, ms)| unsigned.strip_suffix(suffix).map(|number| (number, *ms)))
        .ok_or_else(|| bad("give a unit: -45m, +90s, 3d (ms, s, m, h, d)"))?;
    let count: u64 = number.parse().map_err(|_| bad("not a whole number"))?;
    let magnitude = count.checked_mul(unit_ms).filter(|ms| u128::from(*ms) <= CLOCK_OFFSET_MAX.as_millis());
    let magnitude = magnitude.ok_or_else(|| bad(&format!("more than {} days", CLOCK_OFFSET_MAX.as_secs() / 86_400)))?;
    let signed = i64::try_from(magnitude).map_err(|_| bad("out of range"))?;
    Ok(if negative { -signed } else { signed })
}

/// The error for `key=value`, given its reason.
fn bad_value<'a>(key: &'a str, value: &'a str) -> impl Fn(&str) -> ControlError + 'a {
    move |reason| ControlError::BadValue { key: key.to_owned(), value: value.to_owned(), reason: reason.to_owned() }
}

fn percent(key: &str, value: &str) -> Result<u8, ControlError> {
    let bad = bad_value(key, value);
    let number = value.strip_suffix('%').ok_or_else(|| bad("give a percentage: 10%"))?;
    let percent: u8 = number.parse().map_err(|_| bad("not a whole number"))?;
    if percent > 100 {
        return Err(bad("more than 100%"));
    }
    Ok(percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_with_comments_and_newlines() {
        let text = "# chaos seed 7\ndelay=40ms jitter=20ms   reorder=10%\nduplicate=5% # half the links\n\
                    fsync_delay=2s write_delay=0ms clock_offset=-45m\n";
        let settings = FaultSettings::parse(text).unwrap();
        assert_eq!(
            settings,
            FaultSettings {
                delay: Duration::from_millis(40),
                jitter: Duration::from_millis(20),
                reorder_percent: 10,
                duplicate_percent: 5,
                fsync_delay: Duration::from_secs(2),
                write_delay: Duration::ZERO,
                clock_offset_ms: -45 * 60 * 1000,
            }
        );
        assert!(settings.touches_network());
    }

    #[test]
    fn clock_offsets_take_a_sign_and_a_unit() {
        let offset = |text: &str| FaultSettings::parse(&format!("clock_offset={text}")).map(|s| s.clock_offset_ms);
        assert_eq!(offset("+90s"), Ok(90_000));
        assert_eq!(offset("90s"), Ok(90_000));
        assert_eq!(offset("-250ms"), Ok(-250));
        assert_eq!(offset("-2h"), Ok(-7_200_000));
        assert_eq!(offset("3d"), Ok(3 * 86_400_000));
        assert_eq!(offset("0s"), Ok(0));
    }

    #[test]
    fn an_empty_file_is_no_faults() {
        assert_eq!(FaultSettings::parse("\n# nothing\n").unwrap(), FaultSettings::default());
        assert!(!FaultSettings::default().touches_network());
        assert!(!FaultSettings::parse("fsync_delay=100ms").unwrap().touches_network());
    }

    #[test]
    fn bad_words_fail_the_whole_file() {
        let cases = [
            ("delay=40", "give a unit"),
            ("delay=-4ms", "not a whole number"),
            ("delay=61s", "more than 60 s"),
            ("reorder=10", "give a percentage"),
            ("duplicate=101%", "more than 100%"),
            ("delay=1ms delay=2ms", "given twice"),
            ("latency=4ms", "unknown fault setting"),
            ("delay", "not key=value"),
            ("clock_offset=45", "give a unit"),
            ("clock_offset=--4m", "not a whole number"),
            ("clock_offset=+7301d", "more than 7300 days"),
            ("clock_offset=99999999999999999999d", "not a whole number"),
            ("clock_offset=9999999999999999d", "more than 7300 days"),
        ];
        for (text, expected) in cases {
            let error = FaultSettings::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let huge = "delay=1ms ".repeat(CONTROL_BYTES_MAX);
        assert!(matches!(FaultSettings::parse(&huge), Err(ControlError::TooLarge { .. })));
    }

    #[test]
    fn a_plan_delays_jitters_reorders_and_duplicates_as_drawn() {
        let settings = FaultSettings::parse("delay=40ms jitter=20ms reorder=10% duplicate=5%").unwrap();
        // Draws: jitter 0.5, reorder 0.5 (no), duplicate 0.01 (yes), then the copy: jitter 0,
        // reorder 0.05 (yes).
        let mut draws = [0.5, 0.5, 0.01, 0.0, 0.05].into_iter();
        let plan = settings.plan_send(|| draws.next().unwrap());
        assert_eq!(plan.first, Duration::from_millis(50));
        assert_eq!(plan.second, Some(Duration::from_millis(40) + REORDER_HOLD));
        let mut never = std::iter::repeat(0.999);
        let plan = settings.plan_send(|| never.next().unwrap());
        assert_eq!(plan.second, None);
        assert!(plan.first < Duration::from_millis(60));
    }
}
