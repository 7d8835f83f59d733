// Writes ../canonical_json.json: the canonical JSON golden vectors (docs/protocol.md,
// "Canonical JSON"). Run with Node.js 20 or later: `node sdk/spec/generate/canonical_json.mjs`.
//
// This is an implementation independent of the Rust one: number and string text come from
// ECMAScript's own JSON.stringify (which is what RFC 8785 prescribes), member order from
// Array.prototype.sort (UTF-16 code units, as RFC 8785 prescribes). The one rule added here is
// our deviation from RFC 8785: an integer literal that fits 64 bits (-2^63 .. 2^64-1) keeps its
// exact digits (a BigInt here) instead of being read as a double.
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const INT_MIN = -(2n ** 63n);
const INT_MAX = 2n ** 64n - 1n;

// A small JSON parser that keeps 64-bit integer literals as BigInt.
function parse(text) {
  let at = 0;
  const ws = () => { while (at < text.length && " \t\n\r".includes(text[at])) at++; };
  const fail = (what) => { throw new Error(`${what} at ${at} in ${text}`); };
  function value() {
    ws();
    const c = text[at];
    if (c === "{") {
      at++;
      const members = new Map();
      ws();
      if (text[at] === "}") { at++; return members; }
      for (;;) {
        ws();
        if (text[at] !== '"') fail("member name expected");
        const name = string();
        if (members.has(name)) fail("duplicate member");
        ws();
        if (text[at++] !== ":") fail(": expected");
        members.set(name, value());
        ws();
        const next = text[at++];
        if (next === "}") return members;
        if (next !== ",") fail(", or } expected");
      }
    }
    if (c === "[") {
      at++;
      const items = [];
      ws();
      if (text[at] === "]") { at++; return items; }
      for (;;) {
        items.push(value());
        ws();
        const next = text[at++];
        if (next === "]") return items;
        if (next !== ",") fail(", or ] expected");
      }
    }
    if (c === '"') return string();
    for (const [word, meaning] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, at)) { at += word.length; return meaning; }
    }
    const number = /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
    number.lastIndex = at;
    const m = number.exec(text);
    if (!m) fail("value expected");
    at = number.lastIndex;
    const literal = m[0];
    if (/^-?[0-9]+$/.test(literal)) {
      const big = BigInt(literal);
      if (big >= INT_MIN && big <= INT_MAX) return big;
    }
    const double = Number(literal);
    if (!Number.isFinite(double)) fail("number out of range");
    return double;
  }
  function string() {
    const start = at++;
    while (text[at] !== '"') { if (text[at] === "\\") at++; at++; if (at >= text.length) fail("unterminated string"); }
    at++;
    return JSON.parse(text.slice(start, at));
  }
  const result = value();
  ws();
  if (at !== text.length) fail("trailing text");
  return result;
}

function canonical(v) {
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number" || typeof v === "string" || typeof v === "boolean" || v === null) return JSON.stringify(v);
  if (Array.isArray(v)) return "[" + v.map(canonical).join(",") + "]";
  const names = [...v.keys()].sort();
  return "{" + names.map((n) => JSON.stringify(n) + ":" + canonical(v.get(n))).join(",") + "}";
}

// [name, input JSON text]
const cases = [
  ["RFC 8785 section 3.2.2 example", '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001], "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", "literals": [null, true, false]}'],
  ["RFC 8785 section 3.2.3 sorting example", '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One", "\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080": "Control", "\\u00f6": "Latin Small Letter O With Diaeresis"}'],
  ["members sorted", '{"b": 1, "a": 2, "c": {"z": 1, "y": 2}}'],
  ["names past U+FFFF sort before U+E000..U+FFFF (UTF-16 order, not code points)", '{"\\uffff": 1, "\\ue000": 2, "\\ud800\\udc00": 3, "\\ud83d\\ude00": 4, "\\ud7ff": 5, "z": 6}'],
  ["names: prefix first, uppercase before lowercase, empty name first", '{"ab": 1, "a": 2, "B": 3, "b": 4, "": 5, "a b": 6}'],
  ["whitespace dropped", ' { "a" : [ 1 , 2 , { } , [ ] ] , "b" :\n\t"x y" } '],
  ["nested arrays and objects", '[[[]], {}, [{"b": [{"d": 1, "c": 2}], "a": null}], ""]'],
  ["literals", "[true, false, null]"],
  ["short escapes", '"\\"\\\\\\b\\f\\n\\r\\t"'],
  ["other controls as lowercase \\u00xx", '"\\u0000\\u0001\\u0007\\u000b\\u000e\\u001B\\u001f"'],
  ["solidus, DEL, U+0080, U+2028, U+2029 are not escaped", '"\\/ / \\u007f \\u0080 \\u2028 \\u2029"'],
  ["unicode strings stay as they are (no normalisation)", '"\\u65e5\\u672c\\u8a9e e\\u0301 \\u00e9 \\ud83d\\ude00 \\uffff"'],
  ["literal unicode in the input", '"日本語 😀"'],
  ["integer zero", "0"],
  ["integer negative zero", "-0"],
  ["small integers", "[1, -1, 100, 123456789012]"],
  ["2^53 and 2^53 + 1 as integers keep their digits (our deviation)", "[9007199254740992, 9007199254740993]"],
  ["64-bit integer extremes keep their digits (our deviation)", "[18446744073709551615, 9223372036854775807, -9223372036854775808, 12345678901234567890]"],
  ["integer literals past 64 bits are doubles", "[18446744073709551616, -9223372036854775809, 100000000000000000000, 1000000000000000000000, 999999999999999999999]"],
  ["integral doubles print without fraction", "[1.0, -1.0, 0.0, 100.0, 1e2, 1E2, 1e+2, 9007199254740993.0]"],
  ["double negative zero prints 0", "[-0.0, -0e0, -0.0e-5]"],
  ["1e21 boundary", "[1e20, 1e21, 1e22, 123456789012345678901, 9.99e20, 1.5e21, -1e21]"],
  ["1e-7 boundary", "[0.000001, 1e-6, 0.0000001, 1e-7, 1.5e-7, 0.00000123, 0.000000123, -1e-7]"],
  ["shortest round-trip digits", "[0.1, 0.2, 0.30000000000000004, 0.3333333333333333, 95535577795.73523, 333333333.33333329, 4.50, 2e-3]"],
  ["a tie between two shortest digit strings goes to the even one", "[23099312778824.0625, -2215684815588006.25, 9635320919866.5625]"],
  ["extremes", "[5e-324, 4.9e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308, 1e-27, 1e300]"],
  ["fractions", "[1.5, -2.25, 123.456, 1.23e+5, 123e-2, 0.5e1]"],
  ["values of every kind in one object", '{"port": 8080, "ratio": 0.75, "name": "eu-west", "tags": ["a", "b"], "limits": {"max": 1e21, "min": -0.0}, "on": true, "off": null}'],
];

// Doubles by their IEEE 754 bits, so that no parser stands between the bits and the text.
function doubleCases() {
  const view = new DataView(new ArrayBuffer(8));
  const out = [];
  const add = (double) => {
    view.setFloat64(0, double);
    out.push({ bits: view.getBigUint64(0).toString(16).padStart(16, "0"), canonical: JSON.stringify(double) });
  };
  let state = 0x9e3779b97f4a7c15n;
  const next = () => { // xorshift64*
    state ^= state >> 12n; state ^= (state << 25n) & 0xffffffffffffffffn; state ^= state >> 27n;
    return (state * 0x2545f4914f6cdd1dn) & 0xffffffffffffffffn;
  };
  for (const special of [0, -0, 1, -1, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308,
    1.7976931348623157e308, 2 ** 53, 2 ** 53 + 2, 2 ** 63, 2 ** 64, 1e21, 1e21 * (1 - 2 ** -53),
    1e-7, 1e-7 * (1 + 2 ** -52), 1e-6, 1e-6 * (1 - 2 ** -53), 0.1 + 0.2, 1 / 3, Math.PI, Math.E,
    23099312778824.0625, 1084736168971511.25, 78278683968812.125]) add(special);
  for (let i = 0; i < 200; i++) {
    view.setBigUint64(0, next());
    const double = view.getFloat64(0);
    if (Number.isFinite(double)) add(double);
  }
  for (let i = 0; i < 200; i++) {
    // Decimal-looking values across every branch of Number::toString (exponents -12..27).
    const digits = Number(next() % 10n ** BigInt(1 + Number(next() % 17n)));
    const exponent = Number(next() % 40n) - 12 - String(digits).length;
    add(Number(`${i % 2 ? "-" : ""}${digits}e${exponent}`));
  }
  return out;
}

const escapeNonAscii = (json) => json.replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
const file = {
  about: "Canonical JSON golden vectors (docs/protocol.md, \"Canonical JSON\"). cases: `input` is JSON text; its canonical JSON text must equal `canonical` exactly. doubles: the double with IEEE 754 bits `bits` (big-endian hex) must print as `canonical`. Generated by generate/canonical_json.mjs.",
  cases: cases.map(([name, input]) => ({ name, input, canonical: canonical(parse(input)) })),
  doubles: doubleCases(),
};
const lines = [
  "{",
  `  "about": ${escapeNonAscii(JSON.stringify(file.about))},`,
  '  "cases": [',
  file.cases.map((c) => "    " + escapeNonAscii(JSON.stringify(c))).join(",\n"),
  "  ],",
  '  "doubles": [',
  file.doubles.map((c) => "    " + JSON.stringify(c)).join(",\n"),
  "  ]",
  "}",
  "",
];
writeFileSync(join(dirname(fileURLToPath(import.meta.url)), "..", "canonical_json.json"), lines.join("\n"));
