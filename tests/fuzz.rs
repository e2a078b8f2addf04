//! Any input, no panic: seeded random bytes, and the awkward inputs real files have (NUL bytes,
//! invalid UTF-8, CRLF, a 100,000-character line, one sentence repeated, only unknown words), fed
//! as sentences to `reconstruct`/`encode`/`interpolate`, as training corpora, and in place of a
//! checkpoint's `config.json`, `tokenizer.json` and weights. Every run ends with its output or
//! with an error message — never a panic or a backtrace. Bounded for the suite: a few dozen runs.

mod common;

use std::path::Path;

use common::{textvae, train_tiny, Run};
use rand::Rng;

/// Ended cleanly: success, or a non-zero exit with an `error:` line; no panic either way.
fn clean(run: &Run, what: &str) {
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "{what}: panic\n{}",
        run.stderr
    );
    if !run.status.success() {
        assert!(
            run.stderr.contains("error:"),
            "{what}: failed silently\n{}",
            run.stderr
        );
    }
}

/// Random bytes, sometimes biased towards text (letters, spaces, newlines, CR, NUL, bytes that
/// are not UTF-8), up to `max` long.
fn random_input(rng: &mut impl Rng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max);
    let texty = rng.random_bool(0.6);
    (0..len)
        .map(|_| {
            if !texty {
                return rng.random::<u8>();
            }
            match rng.random_range(0..20) {
                0 => b'\n',
                1 => b'\r',
                2 => 0,
                3 => 0xC3 + rng.random_range(0..2) * 0x20, // a lead byte, often left dangling
                4..=6 => b' ',
                _ => b"the cat sat on mat . dog"[rng.random_range(0..24)],
            }
        })
        .collect()
}

/// The awkward inputs users' files really have.
fn awkward_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("NUL bytes", b"the cat\0sat\nthe\0\0dog\n".to_vec()),
        ("invalid UTF-8", b"the cat \xff\xfe sat\n".to_vec()),
        ("CRLF", b"the cat sat .\r\nthe dog sat .\r\n".to_vec()),
        ("a very long line", "the cat ".repeat(12_500).into_bytes()),
        (
            "one sentence repeated",
            "the cat sat .\n".repeat(200).into_bytes(),
        ),
        (
            "only unknown words",
            "zzyzx qwfp xkcd\n".repeat(3).into_bytes(),
        ),
        ("empty", Vec::new()),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn random_and_awkward_inputs_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    train_tiny(d, &["--epochs", "1", "--out", "m"]).ok();
    let mut rng = textvae::seeded_rng(2026);
    let mut inputs: Vec<(String, Vec<u8>)> = awkward_inputs()
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect();
    for i in 0..8 {
        inputs.push((format!("random input {i}"), random_input(&mut rng, 400)));
    }
    let mut runs = 0;
    for (what, bytes) in &inputs {
        runs += every_command_on(d, what, bytes);
    }
    runs += broken_checkpoints_fail_cleanly(d, &mut rng);
    sizes_are_checked_before_allocating(d);
    eprintln!(
        "{runs} runs on {} inputs and 6 broken checkpoints: no panic",
        inputs.len()
    );
}

/// `bytes` as the input of reconstruct, encode and interpolate (with model `m`) and as a training
/// corpus: each exits cleanly. Returns the number of runs.
fn every_command_on(d: &Path, what: &str, bytes: &[u8]) -> usize {
    let file = write(d, "input.txt", bytes);
    for cmd in ["reconstruct", "encode"] {
        clean(
            &textvae(d, &[cmd, &file, "--checkpoint", "m"]),
            &format!("{cmd} {what}"),
        );
    }
    clean(
        &textvae(d, &["interpolate", "--pairs", &file, "--checkpoint", "m"]),
        &format!("interpolate --pairs {what}"),
    );
    let corpus = write(d, "corpus.txt", bytes);
    let mut args = vec!["train", &corpus];
    args.extend_from_slice(common::TINY_MODEL);
    args.extend_from_slice(&["--epochs", "1", "--out", "c", "--force"]);
    clean(&textvae(d, &args), &format!("train on {what}"));
    4
}

/// A checkpoint whose files are replaced by random bytes or cut short fails to load, saying which
/// file; it never panics. Returns the number of runs.
fn broken_checkpoints_fail_cleanly(d: &Path, rng: &mut impl Rng) -> usize {
    let files = ["config.json", "tokenizer.json", "model.safetensors"];
    let mut runs = 0;
    for (i, name) in files.iter().enumerate() {
        let original = std::fs::read(d.join("m").join(name)).unwrap();
        let cut = original[..original.len() / 2].to_vec();
        for (how, bytes) in [
            ("random bytes", random_input(rng, 2000)),
            ("cut in half", cut),
        ] {
            let broken = format!("b{i}");
            let _ = std::fs::remove_dir_all(d.join(&broken));
            std::fs::create_dir(d.join(&broken)).unwrap();
            for f in files {
                std::fs::copy(d.join("m").join(f), d.join(&broken).join(f)).unwrap();
            }
            write(&d.join(&broken), name, &bytes);
            let run = textvae(d, &["generate", "-n", "2", "--checkpoint", &broken]);
            clean(&run, &format!("{name} {how}"));
            assert!(!run.status.success(), "{name} {how} loaded");
            runs += 1;
        }
    }
    runs
}

/// Sizes a user gives are checked before anything is allocated for them, and any number of
/// samples runs in one batch's memory (z is drawn a batch at a time).
fn sizes_are_checked_before_allocating(d: &Path) {
    let generate = |n: &str, max_len: &str| {
        textvae(
            d,
            &[
                "generate",
                "-n",
                n,
                "--max-len",
                max_len,
                "--checkpoint",
                "m",
            ],
        )
    };
    generate("1", "1000000000").fails_with("--max-len must be at most 10000 tokens");
    generate("1", "10000").ok();
    let many = generate("3000", "3");
    assert_eq!(many.ok().stdout.lines().count(), 3000);
}
