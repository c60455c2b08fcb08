//! The hand-written splitter must cut text exactly like `fancy_regex` with the default
//! pattern. Run: `cargo test --release --test pretokenize` (from rustbpe/).

use proptest::prelude::*;
use rustbpe::{Splitter, DEFAULT_PATTERN};

/// Characters where the pattern's alternatives meet: contractions (with 'ſ' and the Kelvin
/// sign for case folding), spaces of every kind, newlines, numbers that are not digits,
/// combining marks, letters outside the BMP, emoji, CJK, punctuation.
#[rustfmt::skip]
const TRICKY: &[char] = &[
    'a', 'Z', 's', 'S', 'ſ', 'd', 'm', 't', 'T', 'l', 'L', 'v', 'e', 'E', 'r', 'R', 'K', 'k', '\'', '’', ' ', ' ', ' ',
    '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{1680}', '\u{2028}', '\u{3000}', '\u{200B}',
    '0', '7', '²', '½', '٣', 'Ⅻ', '𝟙', '\u{0301}', '\u{20E3}', 'é', 'ß', 'Σ', 'ж', '中', 'ア', '𝔘', '😀', '🇫',
    '\u{FE0F}', '\u{200D}', '.', ',', '!', '-', '"', '(', '$', '@', '_', '\u{0}', '\u{FFFD}', '\u{10FFFF}',
];

fn text() -> impl Strategy<Value = String> {
    let tricky = prop::sample::select(TRICKY);
    let any_char = any::<char>();
    let ch = prop_oneof![8 => tricky, 1 => any_char];
    prop::collection::vec(ch, 0..60).prop_map(|v| v.into_iter().collect())
}

fn assert_same(text: &str) {
    let regex = Splitter::regex(DEFAULT_PATTERN).unwrap();
    let expected = regex.chunks(text).unwrap();
    let got = Splitter::Default.chunks(text).unwrap();
    assert_eq!(got, expected, "text {text:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn hand_splitter_equals_regex_on_random_unicode(s in text()) {
        assert_same(&s);
    }
}

#[test]
fn hand_splitter_equals_regex_on_examples() {
    for s in [
        "",
        "Hello world",
        "I'm you're we'LL they'VE it'S 'ſ 'K 'll'",
        "  \n\n \t x \u{A0}y\r\n\r\nz   ",
        "1234567 ½² ٣٣٣ Ⅻ",
        "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷!",
        "中文字符，测试。日本語のテキスト",
        "e\u{0301}te\u{0301} cafe\u{0301}",
        "def f(x):\n    return x**2  # comment\n",
        "trailing spaces   ",
        "\u{2028}\u{2029}\u{85}end",
    ] {
        assert_same(s);
    }
}

#[test]
fn default_pattern_selects_the_hand_splitter() {
    assert!(matches!(Splitter::new(DEFAULT_PATTERN).unwrap(), Splitter::Default));
    assert!(matches!(Splitter::new(r"\w+|\s+").unwrap(), Splitter::Regex(_)));
    assert!(Splitter::new("(").is_err());
}
