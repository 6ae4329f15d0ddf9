//! The library API end to end: make a tiny model, train a LoRA on the bundled
//! sample data, read the results. `cargo run --release -p backpropagate --example train_tiny`

use backpropagate::config::BatchSize;
use backpropagate::event::Event;
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::train::Trainer;

fn main() -> Result<(), backpropagate::Error> {
    let work = std::env::temp_dir().join("backpropagate-example");
    let model = work.join("tiny-qwen2");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2))?;
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/samples/alpaca.jsonl"
    );

    let summary = Trainer::new(model.to_string_lossy())
        .lora_r(16)
        .learning_rate(1e-2)
        .batch_size(BatchSize::Fixed(4))
        .runs_dir(work.join("runs"))
        .on_event(|e: Event| {
            if let Event::Step { step, loss, .. } = e {
                if step % 10 == 0 {
                    println!("step {step:>3}  loss {loss:.4}");
                }
            }
        })
        .train(data, 40)?;

    println!(
        "{:?} after {} steps; adapter (PEFT format) in {}",
        summary.status,
        summary.steps,
        summary.run_dir.join("adapter").display()
    );
    let gguf = summary.export("gguf", "q4_k_m")?;
    println!("GGUF for llama.cpp / Ollama in {}", gguf.display());
    Ok(())
}
