//! Encode/decode/save/load of the core tokenizer, and the two merge loops agreeing.
//! Run: `cargo test --release --test tokenizer` (from rustbpe/).

use proptest::prelude::*;
use rustbpe::counts::count_chunks;
use rustbpe::{Splitter, Tokenizer, DEFAULT_PATTERN};

const CORPUS: &[&str] = &[
    "the quick brown fox jumps over the lazy dog, the end. aaaaaaaaaaaaaaaa bbbb",
    "Numbers 1234567890 and 3.14159; emoji 😀😀😀 and 中文中文中文 text.",
    "def main():\n    print('hello world')\n    return 0\n\n",
    "the theme of the thesis: there, then, these, those. the the the.",
];

fn trained(vocab_size: usize) -> Tokenizer {
    let counts = count_chunks(CORPUS, &Splitter::Default).unwrap();
    Tokenizer::train_from_counts(&[counts.view()], vocab_size, DEFAULT_PATTERN).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn scan_and_heap_merges_agree(bytes in prop::collection::vec(prop::sample::select(b"the aqbx".to_vec()), 0..400)) {
        let tok = trained(370);
        let mut a: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        let mut b = a.clone();
        tok.merge_scan(&mut a);
        tok.merge_heap(&mut b);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn decode_inverts_encode(s in "\\PC{0,80}") {
        let tok = trained(370);
        let ids = tok.encode(&s).unwrap();
        prop_assert_eq!(tok.decode(&ids).unwrap(), s.as_bytes().to_vec());
    }
}

#[test]
fn frequent_words_become_single_tokens() {
    let tok = trained(370);
    let ids = tok.encode(" the").unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(tok.token_bytes(ids[0]).unwrap(), b" the");
}

#[test]
fn batch_encode_equals_single_encodes() {
    let tok = trained(350);
    let texts: Vec<&str> = CORPUS.iter().copied().chain(["", "x", "the the"]).collect();
    let batch = tok.encode_batch(&texts).unwrap();
    for (t, ids) in texts.iter().zip(batch) {
        assert_eq!(ids, tok.encode(t).unwrap());
    }
}

#[test]
fn save_load_round_trip_keeps_merges_and_pattern() {
    let tok = trained(320);
    let dir = std::env::temp_dir().join(format!("rustbpe-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tok.rbpe");
    tok.save(&path).unwrap();
    let back = Tokenizer::load(&path).unwrap();
    assert_eq!(back.merges(), tok.merges());
    assert_eq!(back.pattern(), DEFAULT_PATTERN);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_rejects_corrupt_files() {
    let bad = |text: &str| Tokenizer::read_from(&mut text.as_bytes()).unwrap_err();
    assert!(bad("hello\n").contains("not a rustbpe tokenizer"));
    assert!(bad("rustbpe merges v1\npattern 3\nabcd\nmerges 0\n").contains("wrong pattern length"));
    assert!(bad("rustbpe merges v1\npattern 1\na\nmerges 1\n300 1\n").contains("not made before"));
    assert!(bad("rustbpe merges v1\npattern 1\na\nmerges 2\n97 98\n").contains("file ends"));
}

#[test]
fn training_rejects_small_vocab_and_empty_corpus() {
    assert!(Tokenizer::train_from_chunks([(&b"ab"[..], 1)], 255, DEFAULT_PATTERN)
        .unwrap_err()
        .contains("below 256"));
    assert!(Tokenizer::train_from_chunks(std::iter::empty(), 300, DEFAULT_PATTERN)
        .unwrap_err()
        .contains("empty"));
}
