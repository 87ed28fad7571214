//! `shoal-apt`: apt's `shoal+http` and `shoal+https` acquire methods.
//!
//! Installed as `/usr/lib/apt/methods/shoal+http` and `/usr/lib/apt/methods/shoal+https`
//! (links to this program); a `sources.list` line `deb shoal+http://deb.debian.org/debian
//! bookworm main` then fetches through Shoal. apt runs it with its messages on stdin and
//! reads the answers on stdout (`shoal_node::apt`); see `docs/apt.md`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().nth(1).is_some() {
        eprintln!(
            "shoal-apt is an apt acquire method: apt runs it as /usr/lib/apt/methods/shoal+http \
             and shoal+https (see docs/apt.md); it takes no arguments"
        );
        return ExitCode::from(2);
    }
    let input = tokio::io::BufReader::new(tokio::io::stdin());
    match shoal_node::apt::method::run(input, tokio::io::stdout()).await {
        Ok(()) => ExitCode::SUCCESS,
        // The 401 General Failure told apt why; 100 is what apt's methods exit with then.
        Err(_) => ExitCode::from(100),
    }
}
