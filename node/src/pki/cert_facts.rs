//! The two facts of a certificate that revocation needs and webpki does not expose: its serial
//! number and the start of its validity. A small DER reader over the certificate's fixed prefix
//! (RFC 5280 4.1): `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
//! serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name, validity SEQUENCE {
//! notBefore Time, ... } ... } ... }`. Every length is checked against what is left, so a
//! malformed certificate gives `None`, never a panic; the certificates read here were already
//! verified against the cluster CA by the handshake or by the gossip seal.

/// Longest serial number RFC 5280 allows (20 octets), as lowercase hex.
pub const SERIAL_HEX_CHARS_MAX: usize = 40;

/// What revocation reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The serial number as lowercase hex, without leading zero octets (DER pads a serial whose
    /// first bit is set with one; `openssl x509 -serial` does not show it).
    pub serial: String,
    /// The start of the validity window, in milliseconds since the Unix epoch.
    pub not_before_ms: u64,
}

/// Reads the serial number and `notBefore` of a DER certificate.
pub fn cert_facts(der: &[u8]) -> Option<CertFacts> {
    let (tag, certificate, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let (mut tag, mut content, mut rest) = tlv(tbs)?;
    if tag == VERSION {
        (tag, content, rest) = tlv(rest)?;
    }
    let unpadded = match content.iter().position(|byte| *byte != 0) {
        Some(first) => &content[first..],
        None => content.get(content.len().saturating_sub(1)..).unwrap_or_default(),
    };
    if tag != INTEGER || unpadded.is_empty() || unpadded.len() * 2 > SERIAL_HEX_CHARS_MAX {
        return None;
    }
    let serial = hex(unpadded);
    let (_, _, rest) = tlv(rest)?; // signature algorithm
    let (_, _, rest) = tlv(rest)?; // issuer
    let (tag, validity, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, not_before, _) = tlv(validity)?;
    let not_before_ms = time_ms(tag, not_before)?;
    Some(CertFacts { serial, not_before_ms })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// One DER element: its tag, its content and what follows it. Only single-octet tags and
/// definite lengths of up to four octets (DER allows nothing else in a certificate's prefix).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || input.len() < octets {
            return None;
        }
        let (length_bytes, rest) = input.split_at(octets);
        input = rest;
        length_bytes.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte))
    };
    if input.len() < length {
        return None;
    }
    let (content, rest) = input.split_at(length);
    Some((tag, content, rest))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the two
/// forms RFC 5280 allows, as milliseconds since the Unix epoch.
fn time_ms(tag: u8, text: &[u8]) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = text.get(range)?;
        part.iter().try_fold(0u64, |value, byte| byte.is_ascii_digit().then(|| value * 10 + u64::from(byte - b'0')))
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 15) => (digits(0..4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let minute = digits(rest + 6..rest + 8)?;
    let second = digits(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 || year < 1970
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000)
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar (years from 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    // The civil-from-days inverse of Howard Hinnant's date algorithms, for years after 1970:
    // a year starts in March, so the leap day is the last day of the previous "year".
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::NODE_CERT_FILE;
    use crate::pki::ca::{init_ca, issue_node_cert};

    /// `dir`'s node certificate, parsed (not through `identity.rs`, which uses revocation, which
    /// uses this module).
    fn node_cert(dir: &std::path::Path) -> Vec<u8> {
        let path = dir.join(NODE_CERT_FILE);
        crate::pki::files::parse_cert(&path, &std::fs::read(&path).unwrap()).unwrap().to_vec()
    }

    #[test]
    fn dates_count_from_the_unix_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 4), 20_791);
        assert_eq!(time_ms(UTC_TIME, b"261204210000Z"), Some(20_791 * 86_400_000 + 21 * 3_600_000));
        assert_eq!(time_ms(GENERALIZED_TIME, b"20261204210000Z"), time_ms(UTC_TIME, b"261204210000Z"));
        assert_eq!(time_ms(UTC_TIME, b"491231235959Z"), time_ms(GENERALIZED_TIME, b"20491231235959Z"));
        for bad in [&b"2612042100Z"[..], b"261304210000Z", b"26120421000aZ", b"261204210000+", b""] {
            assert_eq!(time_ms(UTC_TIME, bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_certificate_issued_now_has_its_serial_and_start() {
        let root = tempfile::tempdir().unwrap();
        init_ca(&root.path().join("ca")).unwrap();
        issue_node_cert(&root.path().join("ca"), "n1", &root.path().join("n1")).unwrap();
        issue_node_cert(&root.path().join("ca"), "n2", &root.path().join("n2")).unwrap();
        let n1 = cert_facts(&node_cert(&root.path().join("n1"))).unwrap();
        let n2 = cert_facts(&node_cert(&root.path().join("n2"))).unwrap();
        assert_ne!(n1.serial, n2.serial);
        assert!(n1.serial.len() >= 2 && n1.serial.len() <= SERIAL_HEX_CHARS_MAX, "{}", n1.serial);
        // Issued with an hour of clock-skew allowance (ca.rs), to the second.
        let now_ms = crate::wall_clock::unix_time().as_secs() * 1000;
        let expected = now_ms - 3_600_000;
        assert!(n1.not_before_ms.abs_diff(expected) <= 5_000, "{} vs {expected}", n1.not_before_ms);
    }

    #[test]
    fn malformed_certificates_give_nothing() {
        let root = tempfile::tempdir().unwrap();
        init_ca(&root.path().join("ca")).unwrap();
        issue_node_cert(&root.path().join("ca"), "n1", &root.path().join("n1")).unwrap();
        let der = node_cert(&root.path().join("n1"));
        // Every truncation and every single-octet change of the prefix either still parses or
        // gives None: no panic, whatever the bytes.
        for cut in 0..der.len().min(400) {
            let _ = cert_facts(&der[..cut]);
        }
        for at in 0..der.len().min(300) {
            for value in [0x00, 0x7f, 0x80, 0x84, 0x85, 0xff] {
                let mut changed = der.clone();
                changed[at] = value;
                let _ = cert_facts(&changed);
            }
        }
        assert_eq!(cert_facts(&[]), None);
        assert_eq!(cert_facts(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert!(cert_facts(&der).is_some());
    }
}
