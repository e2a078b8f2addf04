//! The `textvae` binary end to end, in temporary directories: train, generate, resume, vocab,
//! info, and every bad input giving one clear message and a non-zero exit.

mod common;

use common::{textvae, train_tiny};
use std::path::Path;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn train_then_generate_in_a_temp_dir() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny(dir.path(), &["--epochs", "3", "--log-every", "2"]);
    run.ok();
    assert!(run.stdout.contains("all epochs done"), "{}", run.stdout);
    assert!(
        run.stderr.contains("padding"),
        "training reports the padding share"
    );
    let ckpt = dir.path().join("checkpoints/tiny");
    for f in [
        "config.json",
        "model.safetensors",
        "last.safetensors",
        "tokenizer.json",
        "state.json",
        "metrics.jsonl",
        "heldout.txt",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    // The held-out sentences are the ones validation used: none of them is trained on.
    let heldout = read(&ckpt.join("heldout.txt"));
    assert!(!heldout.trim().is_empty());
    let latest = read(&dir.path().join("checkpoints/LATEST"));
    assert_eq!(Path::new(latest.trim()), ckpt.canonicalize().unwrap());
    let config: serde_json::Value = serde_json::from_str(&read(&ckpt.join("config.json"))).unwrap();
    assert_eq!(config["model"]["latent_dim"], 8);
    // Tying is the default only where the widths allow it (emb 32, hidden 64 here).
    assert_eq!(config["model"]["tie_embeddings"], false);
    assert_eq!(config["tokenizer"], "bpe");
    assert!(config["libtorch_version"]
        .as_str()
        .unwrap()
        .starts_with("2.13"));
    let metrics = read(&ckpt.join("metrics.jsonl"));
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.iter().filter(|r| r["kind"] == "epoch").count(), 3);
    let train_rec = records
        .iter()
        .find(|r| r["kind"] == "train")
        .expect("a train record");
    for key in [
        "step",
        "epoch",
        "loss",
        "rec",
        "kl",
        "beta",
        "lr",
        "tokens_per_sec",
    ] {
        assert!(train_rec.get(key).is_some(), "train record lacks {key}");
    }
    let epoch_rec = records.iter().find(|r| r["kind"] == "epoch").unwrap();
    for key in ["valid_rec", "valid_kl", "valid_elbo", "valid_au"] {
        assert!(epoch_rec.get(key).is_some(), "epoch record lacks {key}");
    }

    // The latest model is found with no flag; seven lines on stdout, nothing else.
    let gen = textvae(
        dir.path(),
        &["generate", "-n", "7", "--temperature", "0.8", "--seed", "3"],
    );
    gen.ok();
    assert_eq!(gen.stdout.lines().count(), 7, "{}", gen.stdout);
    let again = textvae(
        dir.path(),
        &["generate", "-n", "7", "--temperature", "0.8", "--seed", "3"],
    );
    assert_eq!(gen.stdout, again.stdout, "same seed, same samples");
    let greedy = textvae(
        dir.path(),
        &[
            "generate",
            "-n",
            "3",
            "--temperature",
            "0",
            "--checkpoint",
            "checkpoints/tiny",
        ],
    );
    greedy.ok();
    assert_eq!(greedy.stdout.lines().count(), 3);

    // Training curves of the latest model, next to it by default or where -o says.
    let plot = textvae(dir.path(), &["plot"]);
    plot.ok();
    let png = ckpt.canonicalize().unwrap().join("curves.png");
    assert_eq!(Path::new(plot.stdout.trim()), png);
    assert_eq!(png_size(&png), (1400, 900));
    textvae(
        dir.path(),
        &["plot", "--checkpoint", "checkpoints/tiny", "-o", "c.png"],
    )
    .ok();
    assert_eq!(png_size(&dir.path().join("c.png")), (1400, 900));
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn ptb_preset_ties_embeddings_and_reads_words() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::tiny_corpus();
    let mut args = vec!["train", corpus.to_str().unwrap(), "--preset", "ptb"];
    // The tiny sizes, with hidden = emb as tying needs.
    for pair in common::TINY_MODEL.chunks(2) {
        let value = if pair[0] == "--hidden-dim" {
            "32"
        } else {
            pair[1]
        };
        args.extend_from_slice(&[pair[0], value]);
    }
    args.extend_from_slice(&["--epochs", "1"]);
    textvae(dir.path(), &args).ok();
    let config: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("checkpoints/tiny/config.json"))).unwrap();
    assert_eq!(config["tokenizer"], "word");
    assert_eq!(config["model"]["tie_embeddings"], true);
    assert_eq!(
        config["model"]["hidden_dim"], 32,
        "flags override the preset"
    );
    assert_eq!(config["train"]["max_len"], 100);
    textvae(dir.path(), &["generate", "-n", "2", "--seed", "1"]).ok();
    args.extend_from_slice(&["--tie-embeddings", "false", "--force"]);
    textvae(dir.path(), &args).ok();
    let config: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("checkpoints/tiny/config.json"))).unwrap();
    assert_eq!(config["model"]["tie_embeddings"], false);
}

#[test]
fn same_seed_and_threads_give_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let losses = |out: &str| -> Vec<String> {
        train_tiny(
            dir.path(),
            &[
                "--epochs",
                "2",
                "--log-every",
                "1",
                "--seed",
                "9",
                "--out",
                out,
            ],
        )
        .ok();
        read(&dir.path().join(out).join("metrics.jsonl"))
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {} {} {} {}",
                    v["kind"], v["loss"], v["rec"], v["kl"], v["valid_elbo"]
                )
            })
            .collect()
    };
    let a = losses("a");
    let b = losses("b");
    assert!(a.len() > 5);
    assert_eq!(a, b);
}

#[test]
fn resume_continues_and_existing_models_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m"]).ok();
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m"]).fails_with("already holds a model");
    let resumed = train_tiny(dir.path(), &["--epochs", "2", "--out", "m", "--resume"]);
    resumed.ok();
    assert!(resumed.stderr.contains("resuming"), "{}", resumed.stderr);
    let state: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("m/state.json"))).unwrap();
    assert_eq!(state["epoch"], 2);
    // The linear schedule has cooled the rate (2e-3) down by the end of the budget.
    let lr = state["lr"].as_f64().unwrap();
    assert!(lr < 1e-3, "lr {lr} at the end of the run");
    // The budget is the run's: two epochs are spent, so resuming to two has nothing to do.
    train_tiny(dir.path(), &["--epochs", "2", "--out", "m", "--resume"])
        .fails_with("already had its budget (2 of 2 epochs");
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m", "--force"]).ok();
    let state: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("m/state.json"))).unwrap();
    assert_eq!(state["epoch"], 1);
}

#[test]
fn vocab_builds_a_tokenizer_that_train_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::tiny_corpus();
    let v = textvae(
        dir.path(),
        &[
            "vocab",
            corpus.to_str().unwrap(),
            "-o",
            "vocab/tiny.json",
            "--tokenizer",
            "word",
        ],
    );
    v.ok();
    assert!(v.stdout.contains("word tokenizer"), "{}", v.stdout);
    train_tiny(
        dir.path(),
        &["--epochs", "1", "--tokenizer", "vocab/tiny.json"],
    )
    .ok();
    let config = read(&dir.path().join("checkpoints/tiny/config.json"));
    assert!(config.contains("\"tokenizer\": \"word\""), "{config}");
}

#[test]
fn info_reports_versions_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let run = textvae(dir.path(), &["info"]);
    run.ok();
    for needle in [
        "textvae ",
        "libtorch 2.13",
        "cuda available",
        "--device auto picks",
        "threads",
    ] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.txt"), "\n\n  \n").unwrap();
    std::fs::write(d.join("few.txt"), "one sentence .\nanother one .\n").unwrap();
    std::fs::write(d.join("bad.txt"), b"fine line\nbad \xff\xfe line\n").unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();

    let train = |args: &[&str]| {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        textvae(d, &all)
    };
    train(&["missing.txt"]).fails_with("does not exist");
    train(&["adir"]).fails_with("is a directory");
    train(&["empty.txt"]).fails_with("no sentences");
    train(&["bad.txt"]).fails_with("line 2 is not valid UTF-8");
    train(&["few.txt", "--batch-size", "32"]).fails_with("fewer than one batch");
    train(&["few.txt", "--latent-dim", "0"]).fails_with("--latent-dim must be positive");
    train(&["few.txt", "--word-dropout", "1.5"]).fails_with("--word-dropout");
    train(&["few.txt", "--tokenizer", "chars"]).fails_with("--tokenizer must be");
    train(&["few.txt", "--device", "cuda:7"]).fails_with("cuda:7");
    train(&["few.txt", "--threads", "0"]).fails_with("--threads must be positive");
    train(&["few.txt", "--tie-embeddings", "--hidden-dim", "64"])
        .fails_with("--tie-embeddings needs --emb-dim equal to --hidden-dim");
    train(&["few.txt", "--preset", "wiki"]).fails_with("--preset");

    textvae(d, &["generate"]).fails_with("no latest model");
    textvae(d, &["generate", "--checkpoint", "nowhere"]).fails_with("does not exist");
    textvae(d, &["generate", "--checkpoint", "adir"]).fails_with("config.json is missing");

    // A real checkpoint, then broken copies of it.
    train_tiny(d, &["--epochs", "1", "--out", "good"]).ok();
    textvae(d, &["generate", "--temperature", "-1"]).fails_with("--temperature must be >= 0");
    textvae(d, &["generate", "--max-len", "0"]).fails_with("--max-len must be positive");

    let copy = |name: &str| {
        let to = d.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(d.join("good")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
        to
    };
    let corrupt = copy("corrupt");
    std::fs::write(corrupt.join("model.safetensors"), b"not a safetensors file").unwrap();
    textvae(d, &["generate", "--checkpoint", "corrupt"]).fails_with("loading weights");

    let badcfg = copy("badcfg");
    std::fs::write(badcfg.join("config.json"), b"{ nope").unwrap();
    textvae(d, &["generate", "--checkpoint", "badcfg"]).fails_with("unreadable config");

    let nometrics = copy("nometrics");
    std::fs::remove_file(nometrics.join("metrics.jsonl")).unwrap();
    textvae(d, &["plot", "--checkpoint", "nometrics"]).fails_with("metrics.jsonl");
    std::fs::write(nometrics.join("metrics.jsonl"), "{\"kind\":\"train\"}\n").unwrap();
    textvae(d, &["plot", "--checkpoint", "nometrics"]).fails_with("line 1");
    textvae(d, &["plot", "--checkpoint", "good", "-o", "c.jpg"]).fails_with(".png");
    textvae(
        d,
        &["plot", "--checkpoint", "good", "-o", "no/such/dir/c.png"],
    )
    .fails_with("no/such/dir/c.png");

    // A tokenizer built elsewhere does not fit the model.
    let corpus = common::tiny_corpus();
    textvae(
        d,
        &[
            "vocab",
            corpus.to_str().unwrap(),
            "-o",
            "other.json",
            "--tokenizer",
            "word",
        ],
    )
    .ok();
    let mismatch = copy("mismatch");
    std::fs::copy(d.join("other.json"), mismatch.join("tokenizer.json")).unwrap();
    textvae(d, &["generate", "--checkpoint", "mismatch"]).fails_with("tokenizer does not match");
    train_tiny(
        d,
        &[
            "--out",
            "good",
            "--resume",
            "--epochs",
            "2",
            "--tokenizer",
            "other.json",
        ],
    )
    .fails_with("tokenizer does not match");
}

#[test]
fn ctrl_c_stops_after_the_current_step_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::tiny_corpus();
    let mut args = vec!["train", corpus.to_str().unwrap()];
    args.extend_from_slice(common::TINY_MODEL);
    args.extend_from_slice(&["--epochs", "100000", "--log-every", "1", "--out", "m"]);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_textvae"))
        .args(&args)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (a metrics record exists), then interrupt.
    let metrics = dir.path().join("m/metrics.jsonl");
    let start = std::time::Instant::now();
    while !metrics.exists() {
        assert!(start.elapsed().as_secs() < 60, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted"));
    assert!(stderr.contains("checkpoint saved"), "{stderr}");
    for f in ["model.safetensors", "last.safetensors", "state.json"] {
        assert!(
            dir.path().join("m").join(f).is_file(),
            "{f} missing after Ctrl-C"
        );
    }
    // And the interrupted run can be continued, by one epoch past those it finished (the
    // interrupt may have come after the first epoch or during it).
    let state: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("m/state.json"))).unwrap();
    let epochs = (state["epoch"].as_u64().unwrap() + 1).to_string();
    train_tiny(dir.path(), &["--epochs", &epochs, "--out", "m", "--resume"]).ok();
    let state: serde_json::Value =
        serde_json::from_str(&read(&dir.path().join("m/state.json"))).unwrap();
    assert_eq!(state["epoch"].as_u64().unwrap().to_string(), epochs);
}
