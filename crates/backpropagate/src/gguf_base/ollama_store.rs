//! `--model ollama:NAME[:TAG]`: a model in the local Ollama store as the base. The
//! name resolves as Ollama's does (`[host/][namespace/]model[:tag]`, defaults
//! `registry.ollama.ai`, `library`, `latest`, case-insensitive) to its manifest, the
//! manifest's one model layer to a GGUF blob, which is then read like any GGUF file.
//! Ollama's files are only read. The store is `OLLAMA_MODELS`, else Ollama's default
//! for the platform (`~/.ollama/models`; the Linux service's
//! `/usr/share/ollama/.ollama/models`).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{Error, Result};

const MODEL: &str = "application/vnd.ollama.image.model";
const PROJECTOR: &str = "application/vnd.ollama.image.projector";
const ADAPTER: &str = "application/vnd.ollama.image.adapter";
const TEMPLATE: &str = "application/vnd.ollama.image.template";
const SYSTEM: &str = "application/vnd.ollama.image.system";
const PARAMS: &str = "application/vnd.ollama.image.params";
/// Real manifests are about a kilobyte.
const MAX_MANIFEST: u64 = 1 << 20;

/// The stores to look in, in order.
pub fn stores() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let mut out = Vec::new();
    if let Some(home) = dirs::home_dir() {
        out.push(home.join(".ollama").join("models"));
    }
    if cfg!(target_os = "linux") {
        out.push(PathBuf::from("/usr/share/ollama/.ollama/models"));
    }
    out
}

/// (host, namespace, model, tag) of an Ollama model name.
fn parts(name: &str) -> Option<[String; 4]> {
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !t.is_empty() => (p, t),
        _ => (name, "latest"),
    };
    let segs: Vec<&str> = path.split('/').collect();
    let (host, ns, model) = match segs.as_slice() {
        [m] => ("registry.ollama.ai", "library", *m),
        [n, m] => ("registry.ollama.ai", *n, *m),
        [h, n, m] => (*h, *n, *m),
        _ => return None,
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 80
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !s.starts_with('.')
    };
    [host, ns, model, tag]
        .iter()
        .all(|s| ok(s))
        .then(|| [host, ns, model, tag].map(str::to_string))
}

/// `dir/child`, matched case-insensitively as Ollama matches names.
fn child(dir: &Path, name: &str) -> Option<PathBuf> {
    let exact = dir.join(name);
    if exact.exists() {
        return Some(exact);
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(name))
        .map(|e| e.path())
}

/// Every model the store has, as `model:tag` (for messages).
fn listing(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(hosts) = std::fs::read_dir(store.join("manifests")) else {
        return out;
    };
    for host in hosts.filter_map(|e| e.ok()) {
        for ns in std::fs::read_dir(host.path())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            for model in std::fs::read_dir(ns.path())
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
            {
                for tag in std::fs::read_dir(model.path())
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                {
                    let ns_name = ns.file_name().to_string_lossy().into_owned();
                    let prefix = if ns_name == "library" {
                        String::new()
                    } else {
                        format!("{ns_name}/")
                    };
                    out.push(format!(
                        "{prefix}{}:{}",
                        model.file_name().to_string_lossy(),
                        tag.file_name().to_string_lossy()
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

/// The GGUF blob of Ollama model `name`, looked up in `stores` in order, the model's
/// name as `model-tag` in lower case (the same for every spelling), and what its
/// manifest says besides the weights: `{"template", "system", "params"}` from the
/// template, system and params layers, where it has them.
pub fn resolve(name: &str, stores: &[PathBuf]) -> Result<(PathBuf, String, Json)> {
    let spec = Path::new(name);
    let Some([host, ns, model, tag]) = parts(name) else {
        return Err(Error::model(
            spec,
            "is not an Ollama model name (`ollama:model[:tag]`, e.g. `ollama:qwen2.5:0.5b`)",
        ));
    };
    let Some(store) = stores.iter().find(|s| s.join("manifests").is_dir()) else {
        let looked: Vec<String> = stores.iter().map(|s| s.display().to_string()).collect();
        return Err(Error::model(
            spec,
            format!(
                "no Ollama model store here (looked in {}). If Ollama runs on another machine (OLLAMA_HOST), its models are there: copy the model's GGUF here and pass its path; if its store is elsewhere on this machine, set OLLAMA_MODELS",
                looked.join(", ")
            ),
        ));
    };
    let manifest = child(&store.join("manifests"), &host)
        .and_then(|d| child(&d, &ns))
        .and_then(|d| child(&d, &model))
        .and_then(|d| child(&d, &tag))
        .filter(|p| p.is_file());
    let Some(manifest) = manifest else {
        let have = listing(store);
        return Err(Error::model(
            spec,
            format!(
                "Ollama's store at {} has no model `{model}:{tag}` (it has: {}); `ollama pull {model}:{tag}` fetches it",
                store.display(),
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            ),
        ));
    };
    let text = crate::fsx::read_capped(&manifest, MAX_MANIFEST)?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| Error::model(&manifest, format!("not a valid Ollama manifest: {e}")))?;
    let layers = json["layers"].as_array().cloned().unwrap_or_default();
    let of = |kind: &str| {
        layers
            .iter()
            .filter(|l| l["mediaType"] == kind)
            .collect::<Vec<_>>()
    };
    if !of(PROJECTOR).is_empty() {
        return Err(Error::model(
            &manifest,
            format!("`{model}:{tag}` is a vision model (it has an image projector); text models can be trained"),
        ));
    }
    if !of(ADAPTER).is_empty() {
        return Err(Error::model(
            &manifest,
            format!("`{model}:{tag}` is a base plus a LoRA adapter; train from its base model, or from a merged GGUF"),
        ));
    }
    let weights = of(MODEL);
    let [layer] = weights.as_slice() else {
        return Err(Error::model(
            &manifest,
            format!(
                "`{model}:{tag}` has {} model layers; one GGUF is needed",
                weights.len()
            ),
        ));
    };
    let digest = layer["digest"].as_str().unwrap_or("");
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::model(
            &manifest,
            format!("its model layer has an invalid digest {digest:?}"),
        ));
    }
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    if !blob.is_file() {
        return Err(Error::model(
            &blob,
            format!(
                "the manifest of `{model}:{tag}` names this blob but the store does not have it (an interrupted pull?): run `ollama pull {model}:{tag}`"
            ),
        ));
    }
    let mut extras = serde_json::Map::new();
    for (key, kind) in [
        ("template", TEMPLATE),
        ("system", SYSTEM),
        ("params", PARAMS),
    ] {
        let Some(text) = of(kind).first().and_then(|l| small_blob(store, l)) else {
            continue;
        };
        let value = if key == "params" {
            match serde_json::from_str::<Json>(&text) {
                Ok(v) if v.is_object() => v,
                _ => continue,
            }
        } else {
            Json::String(text)
        };
        extras.insert(key.into(), value);
    }
    Ok((
        blob,
        format!("{model}-{tag}").to_lowercase(),
        Json::Object(extras),
    ))
}

/// The text of a small layer (template, system prompt, params), if its blob is there,
/// within [`MAX_MANIFEST`] and UTF-8.
fn small_blob(store: &Path, layer: &Json) -> Option<String> {
    let hex = layer["digest"].as_str()?.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    crate::fsx::read_capped(
        &store.join("blobs").join(format!("sha256-{hex}")),
        MAX_MANIFEST,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::parts;

    #[test]
    fn names_resolve_with_ollamas_defaults() {
        assert_eq!(
            parts("qwen2.5:0.5b").unwrap(),
            ["registry.ollama.ai", "library", "qwen2.5", "0.5b"].map(String::from)
        );
        assert_eq!(
            parts("me/tuned").unwrap(),
            ["registry.ollama.ai", "me", "tuned", "latest"].map(String::from)
        );
        assert_eq!(parts("h.io/a/b:v1").unwrap()[0], "h.io");
        assert!(parts("../../etc:x").is_none());
        assert!(parts("a/b/c/d").is_none());
    }
}
