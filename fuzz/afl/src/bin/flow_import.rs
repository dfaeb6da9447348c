fn main() {
    afl::fuzz!(|data: &[u8]| agora_fuzz::flow_import(data));
}
