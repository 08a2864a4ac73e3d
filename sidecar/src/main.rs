//! The Key Vault sidecar binary (being built; see the issue tracker).

fn main() -> std::process::ExitCode {
    eprintln!("sidecar: not implemented yet in this build");
    std::process::ExitCode::from(2)
}
