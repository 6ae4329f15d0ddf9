//! `ollama-standin [--port N] [--blobs DIR] [--profile legacy|llama-server|no-adapters]`:
//! the test stand-in as a process, for the browser end-to-end test and manual tries
//! (`OLLAMA_HOST=http://127.0.0.1:N`).

use std::net::SocketAddr;

fn main() {
    let mut port = 11434u16;
    let mut blobs = std::env::temp_dir().join("ollama-standin-blobs");
    let mut faults = ollama_standin::Faults::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or(port),
            "--blobs" => blobs = args.next().map(Into::into).unwrap_or(blobs),
            "--profile" => {
                let name = args.next().unwrap_or_default();
                let Some(p) = ollama_standin::Profile::parse(&name) else {
                    eprintln!("unknown profile `{name}`: legacy, llama-server or no-adapters");
                    std::process::exit(2);
                };
                faults.profile = p;
            }
            other => {
                eprintln!(
                    "unknown argument {other}; usage: ollama-standin [--port N] [--blobs DIR] [--profile legacy|llama-server|no-adapters]"
                );
                std::process::exit(2);
            }
        }
    }
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    match ollama_standin::StandIn::start_at(addr, blobs, faults) {
        Ok(s) => {
            println!("ollama stand-in listening on {}", s.url());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}
