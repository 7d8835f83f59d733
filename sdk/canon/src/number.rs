//! Numbers in canonical JSON.
//!
//! * A number held as a 64-bit integer (`u64` or `i64`, as serde_json keeps every integer
//!   literal that fits) prints as its exact decimal digits, even past 2^53. This is our one
//!   deviation from RFC 8785, which reads every number as a double and would print
//!   `18446744073709551615` as `18446744073709552000`: a value keeps every digit it was written
//!   with (the socket and the CLI already refuse integers past 64 bits, `json_strict.rs`).
//! * Any other number is a double and prints as ECMAScript's `Number.prototype.toString` does
//!   (ECMA-262 Number::toString, radix 10), which is what RFC 8785 section 3.2.2.3 requires: the
//!   shortest digits that read back as the same double, in plain decimal from 1e-6 up to below
//!   1e21 and in exponent form (`1e+21`, `1.5e-7`) outside; an integral double has no fraction
//!   (`1.0` prints `1`) and negative zero prints `0`.

use std::fmt::Write as _;

use serde_json::Number;

/// Appends the canonical text of `number` to `out`.
pub fn write_canonical_number(out: &mut String, number: &Number) {
    if let Some(unsigned) = number.as_u64() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{unsigned}");
    } else if let Some(signed) = number.as_i64() {
        let _ = write!(out, "{signed}");
    } else if let Some(double) = number.as_f64() {
        write_es_double(out, double);
    }
}

/// Appends `value` as ECMAScript's `Number::toString(value)` writes it (radix 10). A JSON
/// value never holds NaN or an infinity; they print `null`, as `JSON.stringify` prints them.
pub fn write_es_double(out: &mut String, value: f64) {
    if value == 0.0 {
        // +0 and -0 alike.
        out.push('0');
        return;
    }
    if !value.is_finite() {
        out.push_str("null");
        return;
    }
    if value < 0.0 {
        out.push('-');
    }
    let mut buffer = ryu::Buffer::new();
    let (digits, n) = shortest_digits(buffer.format_finite(value.abs()));
    place_digits(out, &digits, n);
}

/// Ryu prints the shortest digits that read back as the same double, the closest such, and the
/// even one of two as close: exactly the digits ECMA-262 asks for (Rust's own `{:e}` rounds such
/// a tie up: 23099312778824.0625 would print `...063`, not `...062`). Only its layout differs
/// (`1.5e-7`, `100.0`, `1e21`), so this reads its text back as the significant digits, without
/// leading or trailing zeros, and n such that the value is 0.DIGITS times 10^n.
fn shortest_digits(text: &str) -> (String, i32) {
    let (mantissa, exponent) = match text.split_once('e') {
        // Ryu's exponent is always a decimal integer.
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i32>().unwrap_or(0)),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut n = whole.len() as i32 + exponent;
    let mut digits = String::with_capacity(whole.len() + fraction.len());
    for digit in whole.chars().chain(fraction.chars()) {
        if digit == '0' && digits.is_empty() {
            n -= 1;
        } else {
            digits.push(digit);
        }
    }
    digits.truncate(digits.trim_end_matches('0').len());
    (digits, n)
}

/// ECMA-262 Number::toString step 5 onwards: `digits` (k of them, no leading or trailing
/// zero) times 10^(n - k).
fn place_digits(out: &mut String, digits: &str, n: i32) {
    let k = digits.len() as i32;
    if k <= n && n <= 21 {
        // An integer below 1e21: the digits and n - k zeros.
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        // A fraction with n digits before the point.
        let (whole, fraction) = digits.split_at(n as usize);
        out.push_str(whole);
        out.push('.');
        out.push_str(fraction);
    } else if -6 < n && n <= 0 {
        // 0.000001 <= |value| < 1: "0." then -n zeros, then the digits.
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(digits);
    } else {
        // Exponent form: one digit, the rest after a point, "e", a sign, the exponent.
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let exponent = n - 1;
        let _ = write!(out, "e{}{}", if exponent < 0 { '-' } else { '+' }, exponent.unsigned_abs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn es(value: f64) -> String {
        let mut out = String::new();
        write_es_double(&mut out, value);
        out
    }

    #[test]
    fn every_branch_of_number_to_string() {
        assert_eq!(es(1.0), "1");
        assert_eq!(es(-0.0), "0");
        assert_eq!(es(1e20), "100000000000000000000");
        assert_eq!(es(1e21), "1e+21");
        assert_eq!(es(123.456), "123.456");
        assert_eq!(es(0.000001), "0.000001");
        assert_eq!(es(1e-7), "1e-7");
        assert_eq!(es(-1.5e-7), "-1.5e-7");
        assert_eq!(es(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(es(5e-324), "5e-324");
        assert_eq!(es(f64::MAX), "1.7976931348623157e+308");
        assert_eq!(es(f64::NAN), "null");
        // A tie between two shortest candidates goes to the even digit.
        assert_eq!(es(-(23099312778824.0 + 0.0625)), "-23099312778824.062");
    }

    #[test]
    fn integers_print_every_digit() {
        let mut out = String::new();
        write_canonical_number(&mut out, &Number::from(u64::MAX));
        out.push(' ');
        write_canonical_number(&mut out, &Number::from(i64::MIN));
        assert_eq!(out, "18446744073709551615 -9223372036854775808");
    }
}
