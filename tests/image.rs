//! Checks the operator image that testenv/image/build writes against the Dockerfile.
//!
//! The Dockerfile's runtime base (gcr.io/distroless/cc) cannot be pulled on the test
//! machines, so testenv/image/build assembles the same runtime stage from Debian packages
//! and reads the stage's config from the Dockerfile. This test parses the Dockerfile's
//! final stage on its own and compares: user, entrypoint, cmd, exposed ports and labels
//! must be what the Dockerfile says, the image must hold no shell, and it must hold the CA
//! bundle and the operator binary where the Dockerfile copies it.
//!
//! ```sh
//! testenv/image/build --out target/images
//! SCG_IMAGE_DIR=target/images cargo test --test image -- --ignored
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const SHELLS: &[&str] = &["bin/sh", "bin/bash"];
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// What the Dockerfile's final stage sets. `None` is an instruction the stage lacks.
#[derive(Debug, Default, PartialEq)]
struct Stage {
    base: String,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    exposed: BTreeSet<String>,
    labels: BTreeMap<String, String>,
    copies_to: Vec<String>,
}

/// Instructions with their arguments: comment lines dropped, continued lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in dockerfile.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let trimmed = line.trim_end();
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let logical = std::mem::take(&mut pending);
        let logical = logical.trim();
        if logical.is_empty() {
            continue;
        }
        let (word, rest) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((logical, ""));
        out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
    }
    out
}

/// Splits arguments into words at white space outside quotes, removing the quotes and
/// the backslashes that escape within double quotes.
fn words(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = args.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.get_or_insert_with(String::new).extend(chars.next()),
            (_, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(
        quote.is_none(),
        "unterminated quote in Dockerfile arguments: {args}"
    );
    out.extend(word);
    out
}

fn exec_form(instruction: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| {
        panic!("Dockerfile {instruction} {args}: not in exec (JSON array) form: {e}")
    })
}

/// The settings of the stage after the last FROM.
fn final_stage(dockerfile: &str) -> Stage {
    let all = instructions(dockerfile);
    let from = all
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("Dockerfile has no FROM");
    let mut stage = Stage {
        base: words(&all[from].1)
            .into_iter()
            .find(|w| !w.starts_with("--"))
            .expect("FROM without an image"),
        ..Stage::default()
    };
    for (instruction, args) in &all[from + 1..] {
        match instruction.as_str() {
            "USER" => stage.user = Some(args.clone()),
            "ENTRYPOINT" => stage.entrypoint = Some(exec_form(instruction, args)),
            "CMD" => stage.cmd = Some(exec_form(instruction, args)),
            "EXPOSE" => stage.exposed.extend(words(args).into_iter().map(|p| {
                if p.contains('/') {
                    p
                } else {
                    format!("{p}/tcp")
                }
            })),
            "LABEL" => {
                for pair in words(args) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("LABEL {pair}: not KEY=VALUE"));
                    stage.labels.insert(k.to_string(), v.to_string());
                }
            }
            "COPY" => {
                let paths: Vec<String> = words(args)
                    .into_iter()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                stage.copies_to.extend(paths.last().cloned());
            }
            _ => {}
        }
    }
    stage
}

fn image_tar() -> PathBuf {
    let dir = std::env::var_os("SCG_IMAGE_DIR")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "SCG_IMAGE_DIR is not set: build the images with testenv/image/build \
                 (it writes target/images by default) and point SCG_IMAGE_DIR at that directory"
            )
        });
    let tar = PathBuf::from(dir).join("scg-token-operator.tar");
    assert!(
        tar.is_file(),
        "{} does not exist: run testenv/image/build --out $SCG_IMAGE_DIR",
        tar.display()
    );
    tar
}

fn tar<I: AsRef<OsStr>>(args: impl IntoIterator<Item = I>) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    cmd.args(args);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run tar: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One member of the image tarball.
fn member(image: &Path, name: &str) -> Vec<u8> {
    tar([OsStr::new("-xOf"), image.as_os_str(), OsStr::new(name)])
}

fn json_member(image: &Path, name: &str) -> Value {
    serde_json::from_slice(&member(image, name))
        .unwrap_or_else(|e| panic!("{name} in {}: not JSON: {e}", image.display()))
}

/// A layer's entries as (path without leading "./" or "/" or trailing "/", `tar -tv`
/// line), the layer blob being written to a scratch file first.
fn layer_entries(image: &Path, layer: &str, scratch: &Path) -> Vec<(String, String)> {
    let file = scratch.join(layer.replace(['/', ':'], "_"));
    std::fs::write(&file, member(image, layer)).unwrap();
    let listing = tar([
        OsStr::new("--numeric-owner"),
        OsStr::new("-tvf"),
        file.as_os_str(),
    ]);
    String::from_utf8(listing)
        .unwrap()
        .lines()
        .map(|line| {
            let name = line
                .split_whitespace()
                .nth(5)
                .expect("tar -tv line without a name");
            let path = name
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/');
            (path.to_string(), line.to_string())
        })
        .collect()
}

/// A scratch directory for layer blobs, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("scg-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .map(|s| s.as_str().expect("not a string").to_string())
            .collect()
    })
}

/// Compares the image config with the Dockerfile's final stage.
fn assert_config_follows(config: &Value, stage: &Stage) {
    let c = &config["config"];
    assert_eq!(c["User"].as_str().map(str::to_string), stage.user, "User");
    assert_eq!(strings(&c["Entrypoint"]), stage.entrypoint, "Entrypoint");
    assert_eq!(strings(&c["Cmd"]), stage.cmd, "Cmd");
    let exposed: BTreeSet<String> = c["ExposedPorts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(exposed, stage.exposed, "ExposedPorts");
    let labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(labels, stage.labels, "Labels");
    assert_eq!(config["os"], "linux");
}

/// Asserts on the union of the layers: no shell, the CA bundle, the binary executable
/// and owned by root.
fn assert_rootfs(entries: &[(String, String)], binary: &str) {
    for (path, line) in entries {
        for shell in SHELLS {
            assert!(
                path != shell && !path.ends_with(&format!("/{shell}")),
                "the image holds a shell: {line}"
            );
        }
    }
    let find = |wanted: &str| {
        entries
            .iter()
            .rev()
            .find(|(p, _)| p == wanted)
            .map(|(_, l)| l)
    };
    assert!(find(CA_BUNDLE).is_some(), "no {CA_BUNDLE} in the image");
    let line = find(binary).unwrap_or_else(|| panic!("no {binary} in the image"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(
        fields[0].starts_with("-rwx") && fields[1] == "0/0",
        "{binary} must be a regular executable file owned by root: {line}"
    );
}

#[test]
fn the_dockerfile_final_stage_parses() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stage = final_stage(&text);
    assert!(
        stage.base.starts_with("gcr.io/distroless/cc-"),
        "{}",
        stage.base
    );
    assert_eq!(stage.copies_to, ["/scg-token-operator"]);
    assert!(
        stage.entrypoint.is_some() && stage.user.is_some(),
        "{stage:?}"
    );
    assert!(
        stage
            .labels
            .contains_key("org.opencontainers.image.version")
    );

    let sample = "FROM a AS b\nRUN x \\\n  y\nFROM --platform=linux/amd64 c:1\n\
                  # a comment\nLABEL k=\"v w\" \\\n  # inside\n  j='x y' z=\"q\\\"\"\n\
                  EXPOSE 80 53/udp\nUSER 1:2\nCMD [\"a\", \"b c\"]\n";
    let stage = final_stage(sample);
    assert_eq!(stage.base, "c:1");
    let labels: Vec<_> = stage
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert_eq!(labels, ["j=x y", "k=v w", "z=q\""]);
    assert_eq!(
        stage.exposed,
        BTreeSet::from(["80/tcp".into(), "53/udp".into()])
    );
    assert_eq!(stage.user.as_deref(), Some("1:2"));
    assert_eq!(stage.cmd, Some(vec!["a".into(), "b c".into()]));
    assert_eq!(stage.entrypoint, None);
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
#[ignore = "needs the image from testenv/image/build; run by testenv/node-lane"]
fn operator_image_follows_the_dockerfile() {
    let image = image_tar();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stage = final_stage(&dockerfile);

    let manifest = json_member(&image, "manifest.json");
    let manifest = manifest
        .as_array()
        .and_then(|m| m.first())
        .expect("manifest.json: not a one-image list");
    let config = json_member(&image, manifest["Config"].as_str().expect("no Config"));
    assert_config_follows(&config, &stage);

    let scratch = Scratch::new();
    let mut entries = Vec::new();
    for layer in manifest["Layers"].as_array().expect("no Layers") {
        entries.extend(layer_entries(&image, layer.as_str().unwrap(), &scratch.0));
    }

    let binary = stage
        .copies_to
        .last()
        .expect("the final stage copies nothing");
    assert_rootfs(&entries, binary.trim_start_matches('/'));
}
