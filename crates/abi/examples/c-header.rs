//! Prints `guest-tests/kmod/pcisim_regs.h`, the C view of pcisim-abi:
//! `cargo run -p pcisim-abi --example c-header > guest-tests/kmod/pcisim_regs.h`.

use std::io::Write as _;

fn main() -> std::process::ExitCode {
    let mut text = String::new();
    if pcisim_abi::c::write_header(&mut text).is_err() {
        eprintln!("rendering the header failed");
        return std::process::ExitCode::FAILURE;
    }
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writing the header: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
