//! Token estimates for runs whose runtime reported no usage: OpenAI's
//! `o200k_base` encoding over the input text and the answer's message text (never
//! the runtime's JSON envelope). Events carrying an estimate say
//! `token_source = estimated`.

use tiktoken_rs::o200k_base_singleton;

/// Longest text encoded in full; a longer one is estimated from its first
/// `SAMPLE` bytes, scaled by length, so an estimate never costs a request more
/// than a few milliseconds of CPU.
const SAMPLE: usize = 64 * 1024;

/// Loads the encoding (a few hundred milliseconds, once), so that the first
/// request does not pay for it.
pub fn warm() {
    let _ = o200k_base_singleton();
}

/// Estimated token count of `text`.
pub fn estimate(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let bpe = o200k_base_singleton();
    if text.len() <= SAMPLE {
        return bpe.encode_ordinary(text).len() as u64;
    }
    let mut end = SAMPLE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let sampled = bpe.encode_ordinary(&text[..end]).len() as u64;
    sampled
        .saturating_mul(text.len() as u64)
        .div_ceil(end as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_texts_count_their_tokens() {
        assert_eq!(estimate(""), 0);
        assert_eq!(estimate("hello"), 1);
        // Words, not bytes: far below len / 4 for a JSON envelope's worth of text.
        let n = estimate("Hello, how can you help me?");
        assert!((5..=9).contains(&n), "{n}");
    }

    #[test]
    fn long_texts_are_scaled_from_a_sample() {
        let text = "lorem ipsum dolor sit amet ".repeat(10_000);
        let exact = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&text)
            .len() as f64;
        let got = estimate(&text) as f64;
        assert!((got - exact).abs() / exact < 0.02, "{got} vs {exact}");
    }
}
