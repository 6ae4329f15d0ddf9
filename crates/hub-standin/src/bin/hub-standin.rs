//! `hub-standin --repo org/name=DIR[:TOKEN] ...`: the hub stand-in as a process, for the
//! Python cache-compatibility tests (`HF_ENDPOINT=<printed url>`).

use std::collections::BTreeMap;

use hub_standin::{HubStandIn, Repo};

fn main() {
    let mut repos = BTreeMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let spec = match (a.as_str(), args.next()) {
            ("--repo", Some(spec)) => spec,
            _ => {
                eprintln!("usage: hub-standin --repo org/name=DIR[:TOKEN] ...");
                std::process::exit(2);
            }
        };
        let Some((id, rest)) = spec.split_once('=') else {
            eprintln!("--repo wants org/name=DIR, got {spec}");
            std::process::exit(2);
        };
        let (dir, token) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (d, Some(t.to_string())),
            _ => (rest, None),
        };
        repos.insert(
            id.to_string(),
            Repo {
                dir: dir.into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                token,
            },
        );
    }
    match HubStandIn::start(repos, None) {
        Ok(s) => {
            println!("{}", s.url());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("cannot listen: {e}");
            std::process::exit(1);
        }
    }
}
