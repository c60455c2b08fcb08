//! Pre-tokenization: cutting text into chunks that BPE never merges across.
//!
//! The default split pattern ([`DEFAULT_PATTERN`], GPT-4's with numbers in groups of at most
//! two) has a hand-written splitter that gives exactly the chunks `fancy_regex` gives for that
//! pattern, several times faster; any other pattern falls back to `fancy_regex`.
//! `tests/pretokenize.rs` property-tests the hand-written splitter against the regex.
//!
//! The default pattern, alternative by alternative (tried in this order at each position):
//! 1. `'(?i:[sdmt]|ll|ve|re)`           contractions ("'s", "'LL"; `(?i)` also folds 'ſ' to 's')
//! 2. `[^\r\n\p{L}\p{N}]?+\p{L}+`       a letter run, with one leading non-letter/number/newline
//! 3. `\p{N}{1,2}`                      one or two numbers
//! 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`      a punctuation run, with one leading space, then newlines
//! 5. `\s*[\r\n]`                       whitespace up to and including its last newline
//! 6. `\s+(?!\S)`                       whitespace not followed by a non-space (so the last space
//!    of a run stays with the next word)
//! 7. `\s+`                             any other whitespace

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// GPT-4's split pattern with `\p{N}{1,2}` instead of `\p{N}{1,3}` (nanochat's choice).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Cuts text into chunks, with the hand-written splitter or a compiled regex.
#[derive(Debug, Clone)]
pub enum Splitter {
    /// Hand-written equivalent of [`DEFAULT_PATTERN`].
    Default,
    /// Any other pattern.
    Regex(Box<Regex>),
}

impl Splitter {
    /// Splitter for `pattern`; the default pattern gets the hand-written splitter.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Default);
        }
        Self::regex(pattern)
    }

    /// Always the regex engine, even for the default pattern (for tests and benchmarks).
    pub fn regex(pattern: &str) -> Result<Self, String> {
        Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| format!("split pattern {pattern:?} does not compile: {e}"))
    }

    /// Calls `f` on each chunk of `text`, in order; the chunks concatenate to `text`
    /// exactly for the default pattern (a custom pattern may skip text it does not match).
    pub fn for_each_chunk<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Default => {
                let mut start = 0;
                while start < text.len() {
                    let end = chunk_end(text, start);
                    f(&text[start..end]);
                    start = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on a text: {e}"))?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }

    /// All chunks of `text` (convenience for tests and small inputs).
    pub fn chunks<'a>(&self, text: &'a str) -> Result<Vec<&'a str>, String> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c))?;
        Ok(out)
    }
}

/// The character classes the default pattern distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Cls {
    Other = 0,
    Letter = 1,
    Number = 2,
    /// Whitespace other than '\r' and '\n'.
    Space = 3,
    /// '\r' or '\n'.
    Newline = 4,
}

/// Class lookup: a byte per code point of the Basic Multilingual Plane (64 KiB), sorted
/// ranges above it.
struct ClassTable {
    bmp: Vec<Cls>,
    astral: Vec<(u32, u32, Cls)>,
}

fn table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(build_table)
}

/// Code point ranges of a one-class regex such as `\p{L}`, as the regex crates see them.
fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(class).expect("built-in class regex parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        other => panic!("{class} parsed to {other:?}, expected a Unicode class"),
    }
}

fn build_table() -> ClassTable {
    let mut bmp = vec![Cls::Other; 0x10000];
    let mut astral = Vec::new();
    let sets = [(r"\p{L}", Cls::Letter), (r"\p{N}", Cls::Number), (r"\s", Cls::Space)];
    for (class, cls) in sets {
        for (lo, hi) in unicode_ranges(class) {
            for cp in lo..=hi.min(0xFFFF) {
                bmp[cp as usize] = cls;
            }
            if hi > 0xFFFF {
                astral.push((lo.max(0x10000), hi, cls));
            }
        }
    }
    bmp['\r' as usize] = Cls::Newline;
    bmp['\n' as usize] = Cls::Newline;
    astral.sort_unstable_by_key(|r| r.0);
    ClassTable { bmp, astral }
}

#[inline]
fn class_of(c: char) -> Cls {
    let t = table();
    let cp = c as u32;
    if cp < 0x10000 {
        return t.bmp[cp as usize];
    }
    match t.astral.binary_search_by(|&(lo, hi, _)| {
        if hi < cp {
            std::cmp::Ordering::Less
        } else if lo > cp {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(i) => t.astral[i].2,
        Err(_) => Cls::Other,
    }
}

/// The char starting at byte `i` of `s` and its length in bytes, or None at the end.
#[inline]
fn char_at(s: &str, i: usize) -> Option<(char, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, 1));
    }
    let c = s[i..].chars().next()?;
    Some((c, c.len_utf8()))
}

#[inline]
fn class_at(s: &str, i: usize) -> Option<Cls> {
    char_at(s, i).map(|(c, _)| class_of(c))
}

/// End of the run of chars of class `cls` starting at byte `i`.
#[inline]
fn run_end(s: &str, mut i: usize, cls: Cls) -> usize {
    while let Some((c, n)) = char_at(s, i) {
        if class_of(c) != cls {
            break;
        }
        i += n;
    }
    i
}

/// Length of a contraction suffix `(?i:[sdmt]|ll|ve|re)` at byte `i`, if any.
fn contraction_len(s: &str, i: usize) -> Option<usize> {
    let (c1, n1) = char_at(s, i)?;
    match c1 {
        's' | 'S' | 'ſ' | 'd' | 'D' | 'm' | 'M' | 't' | 'T' => Some(n1),
        'l' | 'L' | 'v' | 'V' | 'r' | 'R' => {
            let (c2, n2) = char_at(s, i + n1)?;
            let ok = match c1 {
                'l' | 'L' => matches!(c2, 'l' | 'L'),
                _ => matches!(c2, 'e' | 'E'),
            };
            ok.then_some(n1 + n2)
        }
        _ => None,
    }
}

/// Byte end of the chunk that the default pattern matches at byte `i` (< s.len()).
fn chunk_end(s: &str, i: usize) -> usize {
    let (c, n) = char_at(s, i).expect("chunk_end is called inside the text");
    let cls = class_of(c);
    // 1. contractions
    if c == '\'' {
        if let Some(len) = contraction_len(s, i + n) {
            return i + n + len;
        }
    }
    match cls {
        // 2. a letter run
        Cls::Letter => return run_end(s, i, Cls::Letter),
        // 3. one or two numbers
        Cls::Number => {
            let j = i + n;
            return match char_at(s, j) {
                Some((c2, n2)) if class_of(c2) == Cls::Number => j + n2,
                _ => j,
            };
        }
        // 2. one non-letter/number/newline char, then a letter run
        Cls::Space | Cls::Other if class_at(s, i + n) == Some(Cls::Letter) => {
            return run_end(s, i + n, Cls::Letter);
        }
        _ => {}
    }
    // 4. an optional space, a punctuation run, then newlines
    let punct_start = if cls == Cls::Other {
        Some(i)
    } else if c == ' ' && class_at(s, i + 1) == Some(Cls::Other) {
        Some(i + 1)
    } else {
        None
    };
    if let Some(p) = punct_start {
        return run_end(s, run_end(s, p, Cls::Other), Cls::Newline);
    }
    // Only whitespace is left: scan its run once for alternatives 5-7.
    let mut j = i;
    let mut last_newline_end = None;
    let mut last_char_start = i;
    while let Some((c2, n2)) = char_at(s, j) {
        match class_of(c2) {
            Cls::Newline => last_newline_end = Some(j + n2),
            Cls::Space => {}
            _ => break,
        }
        last_char_start = j;
        j += n2;
    }
    // 5. whitespace up to its last newline
    if let Some(e) = last_newline_end {
        return e;
    }
    // 6. the run, less its last char when a non-space follows; 7. a single space
    if j < s.len() && last_char_start > i {
        last_char_start
    } else {
        j
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        Splitter::Default.chunks(s).unwrap()
    }

    #[test]
    fn splits_like_gpt4_with_two_digit_numbers() {
        assert_eq!(
            split("Hello world's 12345 ,,, \n\n  x\ty"),
            vec!["Hello", " world", "'s", " ", "12", "34", "5", " ,,,", " \n\n", " ", " x", "\ty"]
        );
    }

    #[test]
    fn contraction_folds_long_s_but_not_other_letters() {
        assert_eq!(split("'ſ'K"), vec!["'ſ", "'K"]);
    }

    #[test]
    fn class_table_agrees_with_std_on_numbers() {
        for c in ['7', '²', '½', '٣', 'Ⅻ'] {
            assert_eq!(class_of(c), Cls::Number, "{c:?}");
        }
        assert_eq!(class_of('é'), Cls::Letter);
        assert_eq!(class_of('\u{0301}'), Cls::Other, "combining marks are not \\p{{L}}");
        assert_eq!(class_of('\u{00A0}'), Cls::Space);
        assert_eq!(class_of('𝔘'), Cls::Letter);
    }
}
