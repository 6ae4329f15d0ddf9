//! The app takes a GGUF file as the model: inspecting it reads it into a model folder
//! (once) and reports its architecture and size, as for a Hugging Face folder; a file
//! that is not a GGUF is refused with the engine's message.

use backprop_service::dto::ModelRequest;
use backprop_service::{Service, ServiceConfig};
use backpropagate::config::BatchSize;
use backpropagate::event::Silent;
use backpropagate::export::{export, ExportFormat, ExportOptions, GgufQuant};
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::train::Trainer;

#[test]
fn a_gguf_file_inspects_like_a_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Llama)).unwrap();
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples");
    let run = Trainer::new(model.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(tmp.path().join("runs"))
        .train(samples.join("alpaca.jsonl"), 1)
        .unwrap()
        .run_dir;
    let out = export(
        &run,
        &ExportOptions {
            format: ExportFormat::GgufBase,
            quant: GgufQuant::Q8_0,
            ..Default::default()
        },
        &Silent,
    )
    .unwrap();
    let gguf = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap();
    std::env::set_var("BACKPROP_HOME", tmp.path().join("home"));
    let service = Service::new(ServiceConfig {
        runs_dir: tmp.path().join("runs"),
        ..ServiceConfig::default()
    });
    let info = service
        .inspect_model(&ModelRequest {
            model: gguf.display().to_string(),
        })
        .unwrap();
    assert_eq!(info.architecture, "LlamaForCausalLM");
    assert!(std::path::Path::new(&info.path).starts_with(tmp.path().join("home/bases")));
    assert!(info.parameters > 0.0);

    let fake = tmp.path().join("fake.gguf");
    std::fs::write(&fake, b"not a gguf at all").unwrap();
    let err = service
        .inspect_model(&ModelRequest {
            model: fake.display().to_string(),
        })
        .unwrap_err();
    assert!(err.message.contains("fake.gguf"), "{}", err.message);
}
