//! lz-string's `decompressFromBase64`, as older posthog-js (up to 1.61) compressed its bodies
//! (`compression=lz64`).
//!
//! Written here rather than taken from a crate because the decoder must be bounded for hostile
//! input: an LZW-style stream can describe an output quadratic in its length, and a dictionary
//! of strings can grow as fast. Entries are kept as (previous entry, last unit), so the
//! dictionary is linear in the input, and decoding stops once the output passes `max_units`.

/// Why a body could not be decompressed.
#[derive(Debug, PartialEq, Eq)]
pub enum LzError {
    Corrupt(&'static str),
    /// The output would be larger than the limit.
    TooLarge,
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// No previous entry.
const ROOT: u32 = u32::MAX;

/// A dictionary entry: its text is `previous`'s text followed by `last`.
#[derive(Clone, Copy)]
struct Entry {
    previous: u32,
    last: u16,
    first: u16,
    len: u32,
}

/// Reads the input's bits, lowest first within each 6-bit base64 value, as lz-string does.
struct Bits<'a> {
    input: &'a [u8],
    index: usize,
    value: u8,
    mask: u8,
}

impl Bits<'_> {
    fn new(input: &[u8]) -> Result<Bits<'_>, LzError> {
        let mut bits = Bits {
            input,
            index: 0,
            value: 0,
            mask: 32,
        };
        bits.value = bits.next_value()?;
        Ok(bits)
    }

    /// The next 6-bit value; past the end, zero (as lz-string reads it).
    fn next_value(&mut self) -> Result<u8, LzError> {
        let Some(&byte) = self.input.get(self.index) else {
            self.index += 1;
            return Ok(0);
        };
        self.index += 1;
        match BASE64.iter().position(|&c| c == byte) {
            Some(value) => Ok(value as u8),
            None if byte == b'=' => Ok(0),
            None => Err(LzError::Corrupt("a character outside base64")),
        }
    }

    fn read(&mut self, count: u32) -> Result<u32, LzError> {
        let mut bits = 0;
        for power in 0..count {
            if self.value & self.mask != 0 {
                bits |= 1 << power;
            }
            self.mask >>= 1;
            if self.mask == 0 {
                self.mask = 32;
                self.value = self.next_value()?;
            }
        }
        Ok(bits)
    }

    fn exhausted(&self) -> bool {
        self.index > self.input.len()
    }
}

/// Decompresses lz-string base64 text into UTF-16 units, at most `max_units` of them.
pub fn decompress_from_base64(input: &[u8], max_units: usize) -> Result<Vec<u16>, LzError> {
    let mut bits = Bits::new(input)?;
    let mut dict: Vec<Entry> = vec![
        Entry {
            previous: ROOT,
            last: 0,
            first: 0,
            len: 0,
        };
        3
    ];
    let mut out: Vec<u16> = Vec::new();
    let literal = |bits: &mut Bits<'_>, code: u32| -> Result<u16, LzError> {
        Ok(bits.read(if code == 0 { 8 } else { 16 })? as u16)
    };
    let first = match bits.read(2)? {
        code @ (0 | 1) => literal(&mut bits, code)?,
        2 => return Ok(out),
        _ => return Err(LzError::Corrupt("unknown first code")),
    };
    dict.push(Entry {
        previous: ROOT,
        last: first,
        first,
        len: 1,
    });
    out.push(first);
    let mut w = 3u32;
    let (mut enlarge_in, mut num_bits) = (4u64, 3u32);
    let mut scratch = Vec::new();
    loop {
        if bits.exhausted() {
            return Err(LzError::Corrupt("the stream ends without its end mark"));
        }
        let mut code = bits.read(num_bits)?;
        match code {
            0 | 1 => {
                let unit = literal(&mut bits, code)?;
                dict.push(Entry {
                    previous: ROOT,
                    last: unit,
                    first: unit,
                    len: 1,
                });
                code = (dict.len() - 1) as u32;
                enlarge_in -= 1;
            }
            2 => return Ok(out),
            _ => {}
        }
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
        let previous = dict[w as usize];
        let entry = if (code as usize) < dict.len() {
            dict[code as usize]
        } else if code as usize == dict.len() {
            // The entry being defined: the previous one and its own first unit.
            Entry {
                previous: w,
                last: previous.first,
                first: previous.first,
                len: previous.len + 1,
            }
        } else {
            return Err(LzError::Corrupt("a reference past the dictionary"));
        };
        if out.len() + entry.len as usize > max_units {
            return Err(LzError::TooLarge);
        }
        emit(&dict, entry, &mut scratch, &mut out);
        dict.push(Entry {
            previous: w,
            last: entry.first,
            first: previous.first,
            len: previous.len + 1,
        });
        // The entry just emitted (when it was the one being defined, it is now in place).
        w = code;
        enlarge_in -= 1;
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
    }
}

/// Appends an entry's text to `out` (walking its chain backwards into `scratch`).
fn emit(dict: &[Entry], entry: Entry, scratch: &mut Vec<u16>, out: &mut Vec<u16>) {
    scratch.clear();
    scratch.push(entry.last);
    let mut at = entry.previous;
    while at != ROOT {
        let link = dict[at as usize];
        scratch.push(link.last);
        at = link.previous;
    }
    out.extend(scratch.iter().rev());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(input: &str) -> String {
        String::from_utf16(&decompress_from_base64(input.as_bytes(), 1 << 20).unwrap()).unwrap()
    }

    #[test]
    fn decodes_what_lz_string_encodes() {
        assert_eq!(text("IZA"), "a");
        assert_eq!(text("IbI"), "aa");
        assert_eq!(text("Aco"), "ààà");
        assert_eq!(text("Ac1A"), "àààààà");
        assert_eq!(text("C4e1Q==="), "toto");
        assert_eq!(
            text("MYUwBALgTghglgOzCAzhMADsATVFEz4D2CQA"),
            "ce train est à destination"
        );
    }

    #[test]
    fn a_body_captured_from_posthog_js_decodes_to_its_json() {
        let form = include_str!("../../tests/data/posthog/lz64.txt");
        let data = form
            .strip_prefix("data=")
            .and_then(|rest| rest.split('&').next())
            .unwrap();
        let data = data
            .replace("%2B", "+")
            .replace("%2F", "/")
            .replace("%3D", "=");
        let decoded =
            String::from_utf16(&decompress_from_base64(data.as_bytes(), 1 << 20).unwrap()).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/posthog/lz64.json")).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&decoded).unwrap(),
            expected
        );
    }

    #[test]
    fn hostile_streams_stop_at_the_limit_or_fail() {
        // A long run of one character compresses to a short stream.
        let long = "IbI".to_string();
        assert!(decompress_from_base64(long.as_bytes(), 1).is_err());
        assert_eq!(
            decompress_from_base64(b"!!!!", 100),
            Err(LzError::Corrupt("a character outside base64"))
        );
        for garbage in [
            &b"AAAAAAAAAAAAAAAA"[..],
            b"////////////////",
            b"zzzzzzzzzzzzzzzz",
        ] {
            // Never a panic; an error or a bounded output.
            if let Ok(out) = decompress_from_base64(garbage, 1000) {
                assert!(out.len() <= 1000);
            }
        }
    }
}
