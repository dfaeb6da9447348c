fn main() {
    afl::fuzz!(|data: &[u8]| agora_fuzz::stripe_signature(data));
}
