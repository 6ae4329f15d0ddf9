//! A push job answers the stop button in every network phase: an Ollama that takes
//! the request and never answers must not keep the job, or its run, busy.

use std::time::{Duration, Instant};

use backprop_service::dto::{JobState, PushRequest};
use backprop_service::{Service, ServiceConfig};
use backpropagate::config::BatchSize;
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::train::Trainer;
use ollama_standin::{Faults, StandIn};

fn wait_for(service: &Service, job: &str, done: impl Fn(&JobState) -> bool) -> JobState {
    let start = Instant::now();
    loop {
        let info = service
            .list_jobs()
            .into_iter()
            .find(|j| j.id == job)
            .expect("the job is listed");
        if done(&info.state) {
            return info.state;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job {job} is stuck in {:?}",
            info.state
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stopping_a_push_to_an_ollama_that_never_answers_ends_the_job_and_frees_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).unwrap();
    let runs = dir.path().join("runs");
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples");
    let run = Trainer::new(model.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(&runs)
        .train(samples.join("alpaca.jsonl"), 1)
        .unwrap()
        .run_dir;
    let id = run.file_name().unwrap().to_string_lossy().into_owned();
    let server = StandIn::start(Faults {
        hang_create: true,
        ..Faults::default()
    })
    .unwrap();
    let service = Service::new(ServiceConfig {
        runs_dir: runs,
        ollama_host: Some(server.url()),
        thermal_limit_c: None,
        ..ServiceConfig::default()
    });
    let push = PushRequest {
        name: "stuck".into(),
        quantization: "q8_0".into(),
        as_adapter: false,
        overwrite: false,
    };
    let job = service.push_run(&id, &push).unwrap().id;
    // The export runs first; the create request is where the stand-in hangs.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wait_for(&service, &job, |_| true), JobState::Running);
    let stopped_at = Instant::now();
    service.stop_job(&job).unwrap();
    let end = wait_for(&service, &job, |s| *s != JobState::Running);
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "the push took {:?} to stop",
        stopped_at.elapsed()
    );
    assert_ne!(
        end,
        JobState::Finished,
        "a stopped push must not report success"
    );
    // The run is free again: another writer gets it at once.
    backpropagate::run::RunLock::acquire(&run, "export").unwrap();
}
