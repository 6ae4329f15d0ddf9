//! Names that come from files or servers we do not control (a hub's commit id and file
//! names, the shards a `model.safetensors.index.json` lists) joined onto a folder of
//! ours: only plain relative names are accepted, so the result always lies inside it.
//! The check is on the text, not the disk, because HF cache snapshots are symlinks into
//! `blobs/` and must stay usable.

use std::path::{Component, Path, PathBuf};

/// Longest name accepted; real repo files are far shorter, and a bound keeps error
/// messages and paths sane.
const MAX_NAME: usize = 1024;

/// `dir/name` when `name` is a plain relative path (`a.safetensors`, `sub/b.json`),
/// else why not, in words that fit after "which ...".
pub(crate) fn confined_join(dir: &Path, name: &str) -> Result<PathBuf, &'static str> {
    check_name(name)?;
    let joined = dir.join(name);
    // The text check above should make this impossible; it is the last line of defence
    // against a platform parsing the name differently (a Windows prefix, say).
    let rest = joined
        .strip_prefix(dir)
        .map_err(|_| "would leave its folder")?;
    if rest.as_os_str().is_empty() || !rest.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err("would leave its folder");
    }
    Ok(joined)
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_NAME {
        return Err("is longer than 1024 bytes");
    }
    if name.contains('\\') {
        // URL parsers fold `\` into `/` but Windows file systems take it as a separator.
        return Err("contains a backslash");
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if name.contains(':') {
        // A drive (`C:x`) or an alternate data stream (`a:b`) on Windows.
        return Err("contains `:`");
    }
    if name.starts_with('/') {
        return Err("is an absolute path");
    }
    for part in name.split('/') {
        match part {
            "" => return Err("has an empty part (`//` or a trailing `/`)"),
            "." | ".." => return Err("has a `.` or `..` part"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_names_join_inside_the_folder() {
        let dir = Path::new("/cache/snap");
        for ok in [
            "model.safetensors",
            "sub/model-00001.safetensors",
            "a..b",
            ".gitattributes",
        ] {
            assert_eq!(confined_join(dir, ok).unwrap(), dir.join(ok), "{ok}");
        }
    }

    #[test]
    fn names_that_could_leave_the_folder_are_refused() {
        let dir = Path::new("/cache/snap");
        for bad in [
            "",
            "..",
            "../x",
            "a/../../x",
            "./x",
            "a/./b",
            "/etc/passwd",
            "a//b",
            "a/",
            "..\\..\\x",
            "sub\\x",
            "C:x",
            "C:\\x",
            "a\0b",
            "a\nb",
        ] {
            assert!(confined_join(dir, bad).is_err(), "{bad:?} was accepted");
        }
        assert!(confined_join(dir, &"a".repeat(2000)).is_err());
    }
}
