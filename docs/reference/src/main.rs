//! Prints docs/CONFIG.md: `cargo run --release -p pon-config-reference > docs/CONFIG.md`.

fn main() {
    print!("{}", pon_config_reference::render());
}
