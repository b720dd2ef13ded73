//! The five commands, each thin wiring over the shared stages: it reads its
//! flags, builds capture sources or decoders, transforms and sinks, and runs
//! them under `runtime::start`.
pub mod agent;
pub mod collect;
pub mod dashboard;
pub mod enrich;
pub mod flags;
pub mod split;

/// A command's error on one line, as `flowexport` prints it: the message,
/// then each cause after a colon, unless the text so far already says it
/// (the library's typed errors name their source in their own message, so
/// `{:#}` would print it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !line.contains(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;
    use crate::capture::pins::PinError;

    #[test]
    fn causes_are_printed_once() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("reading x")
            .context("starting");
        assert_eq!(error_line(&e), "starting: reading x: entity not found");
        // A typed error that names its source in its message.
        let e = anyhow::Error::from(PinError::Io {
            path: "/sys/fs/bpf/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(error_line(&e), "--pin-dir /sys/fs/bpf/x: entity not found");
        assert_ne!(format!("{e:#}"), error_line(&e));
    }
}
