//! The `textvae` binary end to end, in temporary directories: train, generate, resume, vocab,
//! info, and every bad input giving one clear message and a non-zero exit.

mod common;

use common::{textvae, train_tiny};
use std::path::Path;
use textvae::checkpoint;

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
    check_checkpoint_files(dir.path(), &ckpt);
    check_metrics(&read(&ckpt.join("metrics.jsonl")), 3);
    check_generate(dir.path());
    check_plot(dir.path(), &ckpt);
}

/// A training run's directory holds everything a checkpoint needs, and `checkpoints/LATEST` names
/// it.
fn check_checkpoint_files(root: &Path, ckpt: &Path) {
    for f in [
        "config.json",
        "model.safetensors",
        "last.safetensors",
        "tokenizer.json",
        "state.json",
        "metrics.jsonl",
        "heldout.txt",
        "characters.txt",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    let chars = read(&ckpt.join("characters.txt"));
    assert!(chars.chars().all(|c| c.len_utf8() > 1), "{chars:?}");
    // The held-out sentences are the ones validation used: none of them is trained on.
    let heldout = read(&ckpt.join("heldout.txt"));
    assert!(!heldout.trim().is_empty());
    let latest = read(&root.join("checkpoints/LATEST"));
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
}

/// `metrics.jsonl` has one record per epoch and training records with every key the plots read.
fn check_metrics(metrics: &str, epochs: usize) {
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "epoch").count(),
        epochs
    );
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
}

/// The latest model is found with no flag; the lines asked for on stdout, nothing else; the same
/// seed gives the same samples.
fn check_generate(root: &Path) {
    let gen = textvae(
        root,
        &["generate", "-n", "7", "--temperature", "0.8", "--seed", "3"],
    );
    gen.ok();
    assert_eq!(gen.stdout.lines().count(), 7, "{}", gen.stdout);
    let again = textvae(
        root,
        &["generate", "-n", "7", "--temperature", "0.8", "--seed", "3"],
    );
    assert_eq!(gen.stdout, again.stdout, "same seed, same samples");
    let greedy = textvae(
        root,
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
}

/// Training curves of the latest model, next to it by default or where -o says.
fn check_plot(root: &Path, ckpt: &Path) {
    let plot = textvae(root, &["plot"]);
    plot.ok();
    let png = ckpt.canonicalize().unwrap().join("curves.png");
    assert_eq!(Path::new(plot.stdout.trim()), png);
    assert_eq!(png_size(&png), (1400, 900));
    textvae(
        root,
        &["plot", "--checkpoint", "checkpoints/tiny", "-o", "c.png"],
    )
    .ok();
    assert_eq!(png_size(&root.join("c.png")), (1400, 900));
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

/// Training ends by fitting the prior to the training sentences' posteriors: the kept weights
/// carry it (the resume point does not), `eval` reports the KL to it beside the KL to N(0, I),
/// generation samples from it, and `fit-prior` refits it or sets N(0, I) back.
#[test]
fn the_prior_is_fitted_when_training_ends_and_can_be_refitted() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny(dir.path(), &["--epochs", "2", "--prior-components", "5"]);
    run.ok();
    assert!(
        run.stderr
            .contains("prior: a mixture of 5 Gaussians fitted to the posteriors of"),
        "{}",
        run.stderr
    );
    let ckpt = dir.path().join("checkpoints/tiny");
    let names = |file: &str| -> Vec<String> {
        tch::Tensor::read_safetensors(ckpt.join(file))
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    let prior_names = ["prior.mu", "prior.logvar", "prior.log_weight"];
    assert!(prior_names
        .iter()
        .all(|n| names("model.safetensors").contains(&n.to_string())));
    assert!(!names("last.safetensors")
        .iter()
        .any(|n| n.starts_with("prior.")));
    let kls = || {
        let ev = textvae(
            dir.path(),
            &[
                "eval",
                "checkpoints/tiny/heldout.txt",
                "--json",
                "--iw-samples",
                "4",
                "--seed",
                "1",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(ev.ok().stdout.trim()).unwrap();
        let f = |k: &str| v[k].as_f64().unwrap();
        assert!(f("nll").is_finite() && f("elbo").is_finite(), "{v}");
        (f("kl"), f("kl_normal"))
    };
    let (kl, kl_normal) = kls();
    assert!(kl.is_finite() && kl != kl_normal, "{kl} {kl_normal}");
    let gen = |seed: &str| textvae(dir.path(), &["generate", "-n", "6", "--seed", seed]);
    assert_eq!(gen("4").ok().stdout.lines().count(), 6);
    assert_eq!(gen("4").stdout, gen("4").stdout, "same seed, same samples");
    let corpus = common::tiny_corpus();
    let c = corpus.to_str().unwrap();
    let refit = textvae(dir.path(), &["fit-prior", c, "--components", "3"]);
    assert!(
        refit.ok().stdout.contains("a mixture of 3 Gaussians"),
        "{}",
        refit.stdout
    );
    let reset = textvae(dir.path(), &["fit-prior", c, "--components", "0"]);
    assert!(
        reset.ok().stdout.contains("the prior is N(0, I)"),
        "{}",
        reset.stdout
    );
    assert!(!names("model.safetensors")
        .iter()
        .any(|n| n.starts_with("prior.")));
    let (kl, kl_normal) = kls();
    assert_eq!(kl, kl_normal);
    textvae(dir.path(), &["fit-prior", c, "--components", "1000000"])
        .fails_with("--components must be at most");
    textvae(dir.path(), &["fit-prior", "missing.txt"]).fails_with("missing.txt");
    textvae(dir.path(), &["fit-prior", c, "--checkpoint", "nowhere"])
        .fails_with("checkpoint nowhere does not exist");
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
fn precision_sets_the_output_layer_format_of_training_steps() {
    let dir = tempfile::tempdir().unwrap();
    let losses = |precision: &str| -> Vec<String> {
        let run = train_tiny(
            dir.path(),
            &[
                "--epochs",
                "1",
                "--log-every",
                "1",
                "--precision",
                precision,
                "--out",
                precision,
            ],
        );
        run.ok();
        assert!(
            run.stderr.contains(&format!(
                "matrix products in {precision} (--precision {precision})"
            )),
            "{}",
            run.stderr
        );
        read(&dir.path().join(precision).join("metrics.jsonl"))
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", v["kind"], v["loss"], v["valid_elbo"])
            })
            .collect()
    };
    let (f32, bf16) = (losses("f32"), losses("bf16"));
    assert_eq!(f32.len(), bf16.len());
    assert_ne!(f32, bf16, "bf16 must change the arithmetic");
}

#[test]
fn resume_continues_and_existing_models_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m"]).ok();
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m"]).fails_with("already holds a model");
    // A checkpoint made before characters.txt existed gets it when resumed.
    let chars_path = dir.path().join("m/characters.txt");
    let chars = read(&chars_path);
    std::fs::remove_file(&chars_path).unwrap();
    let resumed = train_tiny(dir.path(), &["--epochs", "2", "--out", "m", "--resume"]);
    resumed.ok();
    assert_eq!(read(&chars_path), chars);
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
    // What the run was set up with cannot change on --resume; the budget and the rate can.
    let resume = |extra: &[&str]| {
        let mut args = vec!["--epochs", "3", "--out", "m", "--resume"];
        args.extend_from_slice(extra);
        train_tiny(dir.path(), &args)
    };
    resume(&["--num-layers", "2"]).fails_with("--num-layers 2 differs from its 1");
    resume(&["--word-dropout", "0.1"]).fails_with("--word-dropout 0.1 differs from its 0.3");
    resume(&["--valid", common::tiny_corpus().to_str().unwrap()])
        .fails_with("is not what this run validated on");
    let other = dir.path().join("other.txt");
    std::fs::write(&other, read(&common::tiny_corpus()) + "one more line .\n").unwrap();
    let mut args = vec!["train", other.to_str().unwrap()];
    args.extend_from_slice(common::TINY_MODEL);
    args.extend_from_slice(&["--epochs", "3", "--out", "m", "--resume"]);
    textvae(dir.path(), &args).fails_with("is not the corpus this run trained on");
    let changed = resume(&["--lr", "0.001"]);
    changed.ok();
    assert!(
        changed
            .stderr
            .contains("resuming with --lr 0.001 (was 0.002)"),
        "{}",
        changed.stderr
    );
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
        "libtorch_cuda: ",
        "cuda available",
        "--device auto picks",
        "threads",
        "bf16 on the CPU: ",
    ] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
    // Where the CUDA half was not loaded, libtorch must not claim CUDA.
    if run.stdout.contains("libtorch_cuda: not loaded") {
        assert!(run.stdout.contains("cuda available: no"), "{}", run.stdout);
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
    train(&["few.txt", "--encoder-weight-decay", "-1"])
        .fails_with("--encoder-weight-decay must be >= 0");
    train(&["few.txt", "--tokenizer", "chars"]).fails_with("--tokenizer must be");
    train(&["few.txt", "--device", "cuda:7"]).fails_with("cuda:7");
    train(&["few.txt", "--threads", "0"]).fails_with("--threads must be positive");
    train(&["few.txt", "--tie-embeddings", "--hidden-dim", "64"])
        .fails_with("--tie-embeddings needs --emb-dim equal to --hidden-dim");
    train(&["few.txt", "--preset", "wiki"]).fails_with("--preset");
    // A model no machine holds is refused before a byte of it is allocated, and leaves nothing.
    let huge = [
        "few.txt",
        "--batch-size",
        "1",
        "--emb-dim",
        "60000",
        "--hidden-dim",
        "60000",
        "--out",
        "huge",
    ];
    train(&huge).fails_with("training needs at least");
    assert!(!d.join("huge").exists());

    textvae(d, &["generate"]).fails_with("no latest model");
    textvae(d, &["generate", "--checkpoint", "nowhere"]).fails_with("does not exist");
    textvae(d, &["generate", "--checkpoint", "adir"]).fails_with("config.json is missing");

    // A real checkpoint, then broken copies of it.
    train_tiny(d, &["--epochs", "1", "--out", "good"]).ok();
    // Weights pushed past float32's range stop the run at the validation after them, saving
    // nothing from them.
    train_tiny(d, &["--epochs", "2", "--lr", "1e30", "--out", "overflow"])
        .fails_with("the validation ELBO is not finite");
    assert!(!d.join("overflow").join("model.safetensors").exists());
    assert!(!d.join("overflow").join("last.safetensors").exists());
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
    // Weights of another model's shapes are refused by name, not copied in by broadcasting.
    train_tiny(
        d,
        &["--epochs", "1", "--out", "narrow", "--kernel-widths", "3,4"],
    )
    .ok();
    std::fs::copy(
        d.join("good").join("model.safetensors"),
        d.join("narrow").join("model.safetensors"),
    )
    .unwrap();
    textvae(d, &["generate", "--checkpoint", "narrow"]).fails_with("the model's has [8, 32]");

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
    let child = common::spawn_train_tiny(
        dir.path(),
        &["--epochs", "100000", "--log-every", "1", "--out", "m"],
    );
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

/// One run per checkpoint directory: a second `train` on it is refused while the first runs, and
/// the lock goes with a killed run instead of staying stuck. `LATEST` is written beside the
/// directory trained into.
#[test]
fn a_second_run_on_a_directory_is_refused_and_a_killed_run_leaves_no_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut child =
        common::spawn_train_tiny(dir.path(), &["--epochs", "100000", "--out", "models/a"]);
    wait_for_lock(&dir.path().join("models/a"), &child);
    let refusal = format!("is in use by another training run (process {})", child.id());
    train_tiny(
        dir.path(),
        &["--epochs", "1", "--out", "models/a", "--force"],
    )
    .fails_with(&refusal);
    train_tiny(
        dir.path(),
        &["--epochs", "1", "--out", "models/a", "--resume"],
    )
    .fails_with(&refusal);
    child.kill().unwrap();
    child.wait().unwrap();
    train_tiny(
        dir.path(),
        &["--epochs", "1", "--out", "models/a", "--force"],
    )
    .ok();
    let latest = read(&dir.path().join("models/LATEST"));
    let trained = std::fs::canonicalize(dir.path().join("models/a")).unwrap();
    assert_eq!(Path::new(latest.trim()), trained);
    assert!(!dir.path().join("checkpoints").exists());
    // Nothing but the model's files is left in the directory: no temporary file.
    for entry in std::fs::read_dir(dir.path().join("models/a")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains(".tmp"), "{name} left behind");
    }
}

/// Killed at 20 seeded random moments (`TEXTVAE_KILLS` to change; `bench/kills.sh` runs more) —
/// while starting, training or saving — a run always leaves
/// a directory that loads and resumes from its last save: the resumed step is the saved one, the
/// step count never goes back, and no step appears twice in the metrics. SIGTERM saves and
/// exits 0, as Ctrl-C does.
#[test]
fn killed_at_random_moments_the_run_always_resumes_from_its_last_save() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), &["--epochs", "1", "--out", "m"]).ok();
    // The step the resume point (last.safetensors, which holds its own state) was saved at.
    let state_step = || -> u64 {
        let point = checkpoint::read_resume_point(&dir.path().join("m/last.safetensors")).unwrap();
        point.state.expect("the resume point holds its state").step
    };
    let spawn = || {
        common::spawn_train_tiny(
            dir.path(),
            &[
                "--out",
                "m",
                "--resume",
                "--epochs",
                "100000",
                "--log-every",
                "1",
                // A checkpoint every few steps, so that kills land in saves too.
                "--save-every",
                "0.0002",
            ],
        )
    };
    let mut rng = textvae::seeded_rng(20);
    let mut saved = state_step();
    let (mut resumed_checked, mut kills_in_saves) = (0, 0);
    let kills: usize = std::env::var("TEXTVAE_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20);
    for kill in 0..kills {
        let mut child = spawn();
        // Every other kill counts from when the run holds its directory's lock, so that however
        // slow the machine is at starting processes, half the kills land in training and saving;
        // the others count from the start and may land in it.
        if kill % 2 == 1 {
            wait_for_lock(&dir.path().join("m"), &child);
        }
        std::thread::sleep(std::time::Duration::from_millis(
            rng.random_range(150..1200),
        ));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The run started from the step the last one saved.
        if let Some(line) = stderr.lines().find(|l| l.starts_with("resuming m at")) {
            assert!(
                line.contains(&format!(", step {saved},")),
                "kill {kill}: {line}, saved {saved}"
            );
            resumed_checked += 1;
        }
        let in_save = std::fs::read_dir(dir.path().join("m"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp"));
        kills_in_saves += usize::from(in_save);
        let now = state_step();
        assert!(
            now >= saved,
            "kill {kill}: step went back from {saved} to {now}"
        );
        saved = now;
        textvae(dir.path(), &["generate", "-n", "1", "--checkpoint", "m"]).ok();
        assert!(
            train_steps_in_order(&read(&dir.path().join("m/metrics.jsonl"))),
            "kill {kill}: a step appears twice or out of order in the metrics"
        );
    }
    assert!(
        resumed_checked >= kills / 4,
        "only {resumed_checked} runs got as far as resuming"
    );
    eprintln!("{kills} kills: {resumed_checked} after resuming, {kills_in_saves} in the middle of a save, last saved step {saved}");
    assert!(saved > 0);

    // SIGTERM: saved at the next step boundary, exit 0.
    terminate_after(spawn(), 1500);
    assert!(state_step() > saved, "SIGTERM saved nothing new");
}

/// Whether the training records of `metrics.jsonl` have strictly increasing steps.
fn train_steps_in_order(metrics: &str) -> bool {
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    steps.windows(2).all(|w| w[0] < w[1])
}

/// Sends `child` SIGTERM after `millis` and checks that it saved a checkpoint and exited 0.
fn terminate_after(child: std::process::Child, millis: u64) {
    std::thread::sleep(std::time::Duration::from_millis(millis));
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("checkpoint saved"), "{stderr}");
}

/// Waits until the run `child` holds the lock of checkpoint directory `dir` (the lock file names
/// its holder once the run has it).
fn wait_for_lock(dir: &Path, child: &std::process::Child) {
    let lock = dir.join(".lock");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock).ok().as_deref() != Some(&child.id().to_string()) {
        assert!(
            start.elapsed().as_secs() < 60,
            "the run never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
