//! Repair of mojibake: UTF-8 text that was decoded as Latin-1/Windows-1252
//! somewhere upstream (`GarcÃ­a` for `García`), as in MMQA's published records.

use std::borrow::Cow;

/// Windows-1252 characters in 0x80..0x9F, by byte.
const CP1252_HIGH: [(char, u8); 27] = [
    ('€', 0x80),
    ('‚', 0x82),
    ('ƒ', 0x83),
    ('„', 0x84),
    ('…', 0x85),
    ('†', 0x86),
    ('‡', 0x87),
    ('ˆ', 0x88),
    ('‰', 0x89),
    ('Š', 0x8A),
    ('‹', 0x8B),
    ('Œ', 0x8C),
    ('Ž', 0x8E),
    ('‘', 0x91),
    ('’', 0x92),
    ('“', 0x93),
    ('”', 0x94),
    ('•', 0x95),
    ('–', 0x96),
    ('—', 0x97),
    ('˜', 0x98),
    ('™', 0x99),
    ('š', 0x9A),
    ('›', 0x9B),
    ('œ', 0x9C),
    ('ž', 0x9E),
    ('Ÿ', 0x9F),
];

fn byte_of(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 0x100 {
        return Some(code as u8);
    }
    CP1252_HIGH.iter().find(|(ch, _)| *ch == c).map(|(_, b)| *b)
}

/// Returns the repaired text when `s` reads as UTF-8 bytes shown as
/// Latin-1/Windows-1252, else `s` unchanged. Text that is already correct
/// (`km²`, `Misérables`) is left alone: its bytes are not valid UTF-8 when
/// re-encoded, or hold no multi-byte sequence.
pub fn repair(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        return Cow::Borrowed(s);
    }
    let Some(bytes) = s.chars().map(byte_of).collect::<Option<Vec<u8>>>() else {
        return Cow::Borrowed(s);
    };
    match String::from_utf8(bytes) {
        Ok(fixed) if fixed != s && fixed.chars().count() < s.chars().count() => Cow::Owned(fixed),
        _ => Cow::Borrowed(s),
    }
}

/// Repairs every string inside a JSON value, in place.
pub fn repair_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => {
            if let Cow::Owned(fixed) = repair(s) {
                *s = fixed;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(repair_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(repair_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_double_decoded_utf8() {
        assert_eq!(repair("Sergio GarcÃ\u{AD}a"), "Sergio García");
        assert_eq!(repair("Les MisÃ©rables"), "Les Misérables");
        assert_eq!(repair("â€œquotedâ€\u{9d}"), "“quoted”");
    }

    #[test]
    fn leaves_correct_text_alone() {
        for s in ["km²", "Les Misérables", "plain", "Zürich – 5 €"] {
            assert_eq!(repair(s), s);
        }
    }
}
