//! Forgetting, measured: two tasks in sequence (the alpaca sample, then the bike-shop
//! conversations) trained as a two-run multi-run with plain sequential LoRA and with
//! SLAO, same seed and data. Prints held-out loss on task A after A and after B, and on
//! task B after B. `cargo bench -p backpropagate --bench slao_forgetting`

use backpropagate::config::{BatchSize, MultiRunMethod};
use backpropagate::event::Silent;
use backpropagate::fixture::{write_fixture_model, write_two_tasks, Family, FixtureSpec};
use backpropagate::slao::multi_run;
use backpropagate::train::probe::evaluate_adapter;
use backpropagate::train::CancelToken;
use backpropagate::TrainConfig;

fn main() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let model = tmp.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).expect("fixture");
    let (train, held_a, held_b) = write_two_tasks(tmp.path()).expect("tasks");
    println!("| method | A after A | A after B | forgetting on A | B after B |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for method in [MultiRunMethod::Sequential, MultiRunMethod::Slao] {
        let mut c = TrainConfig {
            model: model.display().to_string(),
            data: train.clone(),
            learning_rate: 1e-2,
            batch_size: BatchSize::Fixed(4),
            ..TrainConfig::default()
        };
        c.lora.dropout = 0.0;
        c.multi_run.runs = 2;
        c.multi_run.steps_per_run = 100;
        c.multi_run.replay_ratio = 0.0;
        c.multi_run.method = method;
        let runs = tmp.path().join(format!("{method:?}"));
        let s = multi_run(&c, &runs, &Silent, &CancelToken::default()).expect("multi-run");
        let after_a = s.stages[0].run_dir.join("adapter");
        let adapter = s.adapter.expect("finished");
        let a1 = evaluate_adapter(&model, &after_a, &held_a, 2048).expect("eval");
        let a2 = evaluate_adapter(&model, &adapter, &held_a, 2048).expect("eval");
        let b2 = evaluate_adapter(&model, &adapter, &held_b, 2048).expect("eval");
        println!(
            "| {method:?} | {a1:.4} | {a2:.4} | {:+.4} | {b2:.4} |",
            a2 - a1
        );
    }
}
