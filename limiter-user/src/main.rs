//! `limiter`: the daemon (`limiter run`) and the commands that question it.

fn main() -> std::process::ExitCode {
    limiter::cli::main()
}
