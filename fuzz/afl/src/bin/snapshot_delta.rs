fn main() {
    afl::fuzz!(|data: &[u8]| agora_fuzz::snapshot_delta(data));
}
