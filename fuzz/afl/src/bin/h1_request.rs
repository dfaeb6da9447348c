fn main() {
    afl::fuzz!(|data: &[u8]| agora_fuzz::h1_request(data));
}
