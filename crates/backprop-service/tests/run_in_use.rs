//! A run another job writes is a conflict for the app's clients (HTTP 409 from
//! `backprop serve`), with the engine's message and hint, not a bad request.

use backprop_service::{ErrorKind, ServiceError};
use backpropagate::run::RunLock;

#[test]
fn a_run_in_use_is_a_conflict_with_the_holder_and_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let _held = RunLock::acquire(dir.path(), "train").unwrap();
    let err: ServiceError = RunLock::acquire(dir.path(), "export").unwrap_err().into();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert!(
        err.message
            .contains(&format!("is in use by this process {}", std::process::id())),
        "{}",
        err.message
    );
    assert!(err.hint.is_some());
}
