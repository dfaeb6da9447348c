fn main() {
    afl::fuzz!(|data: &[u8]| agora_fuzz::api_key(data));
}
