pub fn demo(_keep: bool) -> std::process::ExitCode {
    eprintln!("veer demo: not yet");
    std::process::ExitCode::FAILURE
}
