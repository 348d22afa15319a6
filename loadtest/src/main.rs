//! Placeholder: the load generator arrives with issue 4 (see `loadtest/README.md`).
fn main() {
    eprintln!("loadtest: not built yet; see loadtest/README.md");
    std::process::exit(2);
}
