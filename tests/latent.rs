//! Latent-space commands end to end on a model trained here until it reconstructs its corpus:
//! reconstruct, interpolate, encode, the decoding strategies, and their bad inputs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{textvae, Run};

/// One model for the whole file: the tiny corpus memorised (word tokenizer, no dropout, small
/// constant beta, as in tests/model.rs's overfitting test; the size of `common::TINY_MODEL`).
fn model() -> &'static (tempfile::TempDir, PathBuf) {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let corpus = common::tiny_corpus();
        let c = corpus.to_str().unwrap();
        let run = common::train_tiny(
            dir.path(),
            &[
                "--valid",
                c,
                "--out",
                "m",
                "--tokenizer",
                "word",
                "--epochs",
                "100",
                "--lr",
                "0.003",
                "--lr-patience",
                "1000",
                "--word-dropout",
                "0",
                "--emb-dropout",
                "0",
                "--out-dropout",
                "0",
                "--kl-schedule",
                "constant",
                "--beta",
                "0.2",
                "--seed",
                "11",
                "--log-every",
                "1000",
            ],
        );
        run.ok();
        let ckpt = dir.path().join("m");
        (dir, ckpt)
    })
}

fn run(args: &[&str], stdin: Option<&str>) -> Run {
    let (dir, ckpt) = model();
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&["--checkpoint", ckpt.to_str().unwrap(), "--threads", "1"]);
    if !args.contains(&"--seed") {
        all.extend_from_slice(&["--seed", "1"]);
    }
    match stdin {
        None => textvae(dir.path(), &all),
        Some(input) => common::textvae_stdin(dir.path(), &all, input),
    }
}

/// A command's standard output as JSON lines (it must have succeeded).
fn json_lines(out: Run) -> Vec<serde_json::Value> {
    out.ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn corpus_lines() -> Vec<String> {
    std::fs::read_to_string(common::tiny_corpus())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn greedy_reconstruction_returns_the_training_sentences() {
    let out = run(
        &[
            "reconstruct",
            common::tiny_corpus().to_str().unwrap(),
            "--score",
        ],
        None,
    );
    out.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 20);
    let exact = lines
        .iter()
        .filter(|l| {
            let (a, b) = l.split_once('\t').unwrap();
            a == b
        })
        .count();
    assert!(
        exact >= 18,
        "only {exact}/20 reconstructed exactly:\n{}",
        out.stdout
    );
    assert!(out.stderr.contains("token accuracy"), "{}", out.stderr);

    // Beam search of width 1 is greedy; several samples per sentence come out adjacent.
    let beam1 = run(
        &[
            "reconstruct",
            common::tiny_corpus().to_str().unwrap(),
            "--beam",
            "1",
        ],
        None,
    );
    assert_eq!(beam1.ok().stdout, out.stdout);
    let multi = run(
        &["reconstruct", "-", "--sample", "--num", "3", "--json"],
        Some("the cat sat on the mat .\n"),
    );
    let v: serde_json::Value = serde_json::from_str(multi.ok().stdout.trim()).unwrap();
    assert_eq!(v["reconstructions"].as_array().unwrap().len(), 3);
}

#[test]
fn interpolation_runs_from_a_to_b() {
    let lines = corpus_lines();
    let (a, b) = (&lines[0], &lines[11]);
    let recon = run(&["reconstruct", "-"], Some(&format!("{a}\n{b}\n")));
    let recon: Vec<String> = recon
        .ok()
        .stdout
        .lines()
        .map(|l| l.split_once('\t').unwrap().1.to_string())
        .collect();
    for method in ["lerp", "slerp"] {
        let even = |steps: &str| {
            let args = ["interpolate", a, b, "--steps", steps, "--method", method];
            let out = run(&[&args[..], &["--spread", "even"]].concat(), None);
            out.ok()
                .stdout
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let walk = even("5");
        assert_eq!(walk.len(), 7, "{method}: {walk:?}");
        assert_eq!(walk[0], recon[0], "{method} starts at A's reconstruction");
        assert_eq!(walk[6], recon[1], "{method} ends at B's reconstruction");

        // The default shows the sentences met along the path: those of a walk decoded at 16
        // points per step, each once, in order, both ends included.
        let mut met = even("95");
        met.dedup();
        let out = run(
            &["interpolate", a, b, "--steps", "5", "--method", method],
            None,
        );
        let shown: Vec<String> = out.ok().stdout.lines().map(String::from).collect();
        assert_eq!(
            shown.len(),
            met.len().min(7),
            "{method}: {shown:?} of {met:?}"
        );
        assert_eq!(shown[0], recon[0]);
        assert_eq!(shown[shown.len() - 1], recon[1]);
        let mut rest = met.iter();
        assert!(
            shown.iter().all(|l| rest.any(|m| m == l)),
            "{method}: {shown:?} is not in the order of {met:?}"
        );
    }
    let prior = run(
        &["interpolate", "--prior", "--steps", "2", "--top-p", "0.9"],
        None,
    );
    assert_eq!(prior.ok().stdout.lines().count(), 4);

    let (dir, _) = model();
    let pairs = dir.path().join("pairs.tsv");
    std::fs::write(&pairs, format!("{a}\t{b}\n{b}\t{a}\n")).unwrap();
    let many = run(
        &[
            "interpolate",
            "--pairs",
            pairs.to_str().unwrap(),
            "--steps",
            "1",
        ],
        None,
    );
    let blocks: Vec<&str> = many.ok().stdout.split("\n\n").collect();
    assert_eq!(blocks.len(), 2, "{}", many.stdout);
    assert!(blocks
        .iter()
        .all(|b| (1..=3).contains(&b.trim().lines().count())));
}

#[test]
fn encode_gives_one_vector_of_the_latent_size_per_input() {
    let rows = json_lines(run(
        &["encode", common::tiny_corpus().to_str().unwrap()],
        None,
    ));
    assert_eq!(rows.len(), 20);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["line"], i + 1, "input order is kept");
        assert_eq!(r["mu"].as_array().unwrap().len(), 8);
        assert_eq!(r["logvar"].as_array().unwrap().len(), 8);
    }
    let tsv = run(
        &["encode", "-", "--format", "tsv"],
        Some("the cat sat on the mat .\n"),
    );
    let fields: Vec<&str> = tsv.ok().stdout.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 3);
    assert_eq!(fields[1].split(' ').count(), 8);

    let (dir, _) = model();
    let npy = dir.path().join("z.npy");
    let encode_to = |out: &Path| {
        let corpus = common::tiny_corpus();
        let args = ["encode", corpus.to_str().unwrap(), "--format", "npy", "-o"];
        run(&[&args[..], &[out.to_str().unwrap()]].concat(), None)
    };
    encode_to(&npy).ok();
    let t = tch::Tensor::read_npy(&npy).unwrap();
    assert_eq!(t.size(), vec![20, 2, 8]);
    // Same numbers as the JSON lines (mu of the first sentence).
    let first: Vec<f64> = rows[0]["mu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((t.double_value(&[0, 0, 0]) - first[0]).abs() < 1e-5);
    // Written through a temporary file that is gone once the array is in place; a target that
    // cannot be written is named as the user gave it.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let unwritable = dir.path().join("no-such-dir").join("z.npy");
    encode_to(&unwritable).fails_with(&format!("saving {}", unwritable.display()));
}

/// `decode` turns encode's codes, in each of its formats, back into what `reconstruct` writes
/// for the same sentences; vectors made elsewhere decode too, and bad ones are refused by line.
#[test]
fn decode_turns_codes_back_into_sentences() {
    let corpus = common::tiny_corpus();
    let c = corpus.to_str().unwrap();
    let reconstructed: String = run(&["reconstruct", c], None)
        .ok()
        .stdout
        .lines()
        .map(|l| format!("{}\n", l.split_once('\t').unwrap().1))
        .collect();
    let (dir, _) = model();
    let npy = dir.path().join("codes.npy");
    let n = npy.to_str().unwrap();
    run(
        &["encode", c, "--format", "npy", "-o", n, "--refine", "5"],
        None,
    )
    .ok();
    assert_eq!(run(&["decode", n], None).ok().stdout, reconstructed);
    let refined = run(&["decode", n, "--field", "z"], None);
    assert_eq!(refined.ok().stdout.lines().count(), 20);
    for format in ["jsonl", "tsv"] {
        let codes = run(&["encode", c, "--format", format], None);
        let decoded = run(&["decode"], Some(&codes.ok().stdout));
        assert_eq!(decoded.ok().stdout, reconstructed, "{format}");
    }

    // A code of one's own: the mean of the first two sentences' codes, as plain numbers.
    let rows = json_lines(run(&["encode", c], None));
    let mean: Vec<String> = (0..8)
        .map(|i| {
            let x = |r: usize| rows[r]["mu"][i].as_f64().unwrap();
            format!("{}", (x(0) + x(1)) / 2.0)
        })
        .collect();
    let out = run(&["decode", "-"], Some(&format!("\n{}\n", mean.join(", "))));
    assert_eq!(out.ok().stdout.lines().count(), 1);
    // Several samples of p(x|z) per code, a code's on adjacent lines; seeded, so repeatable.
    let sampled = |seed: &str| {
        let args = [
            "decode",
            n,
            "--num",
            "3",
            "--temperature",
            "1",
            "--seed",
            seed,
        ];
        run(&args, None).ok().stdout.clone()
    };
    let three = sampled("4");
    assert_eq!(three.lines().count(), 60);
    assert_eq!(three, sampled("4"));
    let lines: Vec<&str> = three.lines().collect();
    let varied = lines
        .chunks(3)
        .filter(|k| k[0] != k[1] || k[1] != k[2])
        .count();
    assert!(varied > 0, "{three}");
    run(&["decode", n, "--num", "3"], None).fails_with("greedy and beam decoding give one");
    run(&["reconstruct", c, "--num", "3", "--beam", "2"], None).fails_with("--sample");
    run(&["decode", n, "--num", "0", "--temperature", "1"], None)
        .fails_with("--num must be at least 1");

    let short = run(&["decode"], Some("0 0 0 0 0 0 0 0\n1 2 3\n"));
    short.fails_with("a code of 3 numbers, but the model's z has 8");
    assert!(short.stderr.contains("line 2"), "{}", short.stderr);
    run(&["decode", "--field", "z"], Some(&rows_text(&rows[..1])))
        .fails_with("no \"z\" field (encode --refine writes it)");
    run(&["decode"], Some("\n")).fails_with("no codes");

    // npy as numpy writes it: float64, big-endian, Fortran order — the same codes, the same
    // sentences, known by content rather than name; a file shorter than its header says is
    // refused, not read past its end.
    let mu: Vec<f64> = rows[..3]
        .iter()
        .flat_map(|r| {
            r["mu"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
        })
        .collect();
    let column_major: Vec<f64> = (0..8)
        .flat_map(|j| (0..3).map(move |i| (i, j)))
        .map(|(i, j)| mu[i * 8 + j])
        .collect();
    let be: Vec<u8> = column_major.iter().flat_map(|x| x.to_be_bytes()).collect();
    let fortran = dir.path().join("fortran.codes");
    std::fs::write(&fortran, npy_bytes(">f8", "(3, 8)", true, &be)).unwrap();
    let first3: String = reconstructed
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        run(&["decode", fortran.to_str().unwrap()], None)
            .ok()
            .stdout,
        first3
    );
    let short = dir.path().join("short.npy");
    std::fs::write(&short, npy_bytes("<f4", "(1000000000, 8)", false, &[0; 40])).unwrap();
    run(&["decode", short.to_str().unwrap()], None).fails_with("fewer numbers than its shape");
}

/// An npy file: the magic string, version 1.0, the header padded to 64 bytes, the data.
fn npy_bytes(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn rows_text(rows: &[serde_json::Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// `textvae generate | head -1`: when the reader stops, the command stops too, quietly and
/// with success, as the other producers of a pipeline do.
#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    use std::io::BufRead;
    let (dir, ckpt) = model();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_textvae"))
        .args([
            "generate",
            "-n",
            "1000000",
            "--batch-size",
            "16",
            "--seed",
            "1",
        ])
        .args(["--threads", "1", "--checkpoint", ckpt.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.trim().is_empty());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn decoding_with_a_fixed_seed_is_repeatable() {
    let args = [
        "generate",
        "-n",
        "5",
        "--top-k",
        "5",
        "--temperature",
        "0.9",
    ];
    let a = run(&args, None);
    let b = run(&args, None);
    assert_eq!(a.ok().stdout, b.ok().stdout);
    let blocked = run(
        &[
            "generate",
            "-n",
            "20",
            "--temperature",
            "0",
            "--no-repeat-ngram",
            "2",
        ],
        None,
    );
    for line in blocked.ok().stdout.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let mut seen = std::collections::HashSet::new();
        assert!(
            words.windows(2).all(|w| seen.insert(w.to_vec())),
            "repeated bigram in {line:?}"
        );
    }
    let beam = run(&["generate", "-n", "4", "--beam", "3"], None);
    assert_eq!(beam.ok().stdout.lines().count(), 4);
}

#[test]
fn bad_latent_inputs_behave_as_documented() {
    // Blank lines are skipped with a warning; all-unknown and over-long sentences are encoded
    // all the same, with a warning naming the line.
    let long = vec!["the"; 80].join(" ");
    let out = run(
        &["reconstruct", "-"],
        Some(&format!("\nxyzzy plugh\n{long}\n")),
    );
    out.ok();
    assert_eq!(out.stdout.lines().count(), 2);
    assert!(
        out.stderr.contains("skipped 1 blank lines"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(
            "1 sentences made only of tokens unknown to the model, encoded as <unk> (line 2)"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("1 sentences longer than the 64 tokens the model was trained on, encoded in full (line 3)"),
        "{}",
        out.stderr
    );

    run(&["reconstruct", "-"], Some("\n\n")).fails_with("no sentences on standard input");
    run(&["interpolate", "", "the cat sat on the mat ."], None)
        .fails_with("sentence 1 of the interpolation is empty");
    run(&["interpolate", "a", "b", "--steps", "0"], None).fails_with("--steps must be in 1..=");
    run(
        &[
            "interpolate",
            "a",
            "b",
            "--spread",
            "sentences",
            "--top-k",
            "5",
        ],
        None,
    )
    .fails_with("--spread sentences needs greedy or beam decoding");
    // Sizes past any use are refused before anything is allocated.
    run(&["interpolate", "a", "b", "--steps", "1000000000"], None)
        .fails_with("--steps must be in 1..=100000");
    run(&["generate", "--beam", "1000000"], None).fails_with("--beam must be at most 1000");
    run(&["generate", "--batch-size", "100000000"], None).fails_with("--batch-size must be in");
    run(&["eval", "-", "--iw-samples", "10000000"], Some("a b\n"))
        .fails_with("--iw-samples must be in");
    run(&["generate", "--top-p", "0"], None).fails_with("--top-p must be in (0, 1]");
    run(&["generate", "--top-p", "1.5"], None).fails_with("--top-p must be in (0, 1]");
    run(&["generate", "--beam", "0"], None).fails_with("--beam must be at least 1");
    run(&["encode", "-", "--format", "npy"], Some("a\n")).fails_with("needs -o");
    let (dir, _) = model();
    let bad = dir.path().join("bad_pairs.tsv");
    std::fs::write(&bad, "only one sentence\n").unwrap();
    run(&["interpolate", "--pairs", bad.to_str().unwrap()], None)
        .fails_with("line 1: expected two sentences");
    assert!(Path::new(&bad).exists());
}

/// `eval` and `reconstruct --score` report the same reconstruction: greedy from the posterior
/// mean (or beam search, asked of both), the default repeat guard, the same scoring code.
#[test]
fn eval_reports_the_reconstruction_that_reconstruct_scores() {
    let corpus = common::tiny_corpus();
    let c = corpus.to_str().unwrap();
    for (decoding, extra) in [("greedy", vec![]), ("beam 2", vec!["--beam", "2"])] {
        let ev = run(
            &[&["eval", c, "--json", "--iw-samples", "2"], &extra[..]].concat(),
            None,
        );
        let v: serde_json::Value = serde_json::from_str(ev.ok().stdout.trim()).unwrap();
        assert_eq!(v["rec_decoding"], decoding);
        // No terminal here: progress comes as log lines on stderr, the last one at 100%.
        assert!(
            ev.stderr
                .lines()
                .any(|l| l.starts_with("eval: the NLL's samples: 100% after")),
            "no progress line:\n{}",
            ev.stderr
        );
        let rec = run(&[&["reconstruct", c, "--score"], &extra[..]].concat(), None);
        let line = rec
            .ok()
            .stderr
            .lines()
            .find(|l| l.starts_with("score:"))
            .unwrap_or_else(|| panic!("no score line:\n{}", rec.stderr))
            .to_string();
        // "score: token accuracy A, exact match E, BLEU-4 B over ..."
        let number_after = |key: &str| -> f64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            let tok = rest.split([',', ' ']).find(|t| !t.is_empty()).unwrap();
            tok.parse().unwrap()
        };
        let f = |k: &str| v[k].as_f64().unwrap();
        for (key, label, tolerance) in [
            ("rec_acc", "token accuracy", 6e-5),
            ("rec_exact", "exact match", 6e-5),
            ("rec_bleu", "BLEU-4", 6e-3),
        ] {
            assert!(
                (f(key) - number_after(label)).abs() < tolerance,
                "{decoding}: {line} vs {v}"
            );
        }
        // The memorised corpus comes back nearly whole, so the figures are not vacuous.
        assert!(f("rec_acc") > 0.9 && f("rec_bleu") > 80.0, "{v}");
    }
    run(&["eval", c, "--beam", "0"], None).fails_with("--beam must be in 1..=");
}

/// `eval --sentences N` scores N sentences spread through the file; more than there are is all.
#[test]
fn eval_takes_an_evenly_spaced_subset() {
    let corpus = common::tiny_corpus();
    let c = corpus.to_str().unwrap();
    let sentences = |n: &str| eval_json("2", "1", &["--sentences", n])["sentences"].clone();
    assert_eq!(sentences("5"), 5);
    assert_eq!(sentences("1000"), 20);
    run(&["eval", c, "--sentences", "0"], None).fails_with("--sentences must be at least 1");
}

/// `eval --json` of the tiny corpus with K importance samples, a seed and further flags.
fn eval_json(k: &str, seed: &str, extra: &[&str]) -> serde_json::Value {
    let corpus = common::tiny_corpus();
    let c = corpus.to_str().unwrap();
    let args = [
        &["eval", c, "--json", "--iw-samples", k, "--seed", seed][..],
        extra,
    ]
    .concat();
    serde_json::from_str(run(&args, None).ok().stdout.trim()).unwrap()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap()
}

/// `eval --json` has exactly the documented keys, and PPL is exp(total NLL / tokens).
#[test]
fn eval_json_has_its_keys_and_ppl_follows_nll() {
    let v = eval_json("1", "1", &[]);
    let keys = [
        "sentences",
        "tokens",
        "rec",
        "kl",
        "kl_normal",
        "elbo",
        "nll",
        "ppl",
        "mi",
        "au",
        "iw_samples",
        "iw_precision",
        "rec_decoding",
        "rec_acc",
        "rec_exact",
        "rec_bleu",
    ];
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), keys.len(), "{obj:?}");
    for key in keys {
        assert!(obj.contains_key(key), "--json lacks {key}");
    }
    assert_eq!(v["sentences"], 20);
    let (n, t) = (num(&v, "sentences"), num(&v, "tokens"));
    assert!((num(&v, "ppl") - (num(&v, "nll") * n / t).exp()).abs() < 1e-6 * num(&v, "ppl"));
}

#[test]
fn importance_weighted_nll_tightens_the_elbo_bound() {
    let ones: Vec<serde_json::Value> = (1..=6)
        .map(|s| eval_json("1", &s.to_string(), &[]))
        .collect();
    // The noise of a one-sample estimate, measured over six seeds.
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let elbos: Vec<f64> = ones.iter().map(|v| num(v, "elbo")).collect();
    let nll1: Vec<f64> = ones.iter().map(|v| num(v, "nll")).collect();
    let spread = |xs: &[f64]| {
        let m = mean(xs);
        (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
    };
    let noise = (spread(&elbos).max(spread(&nll1)) * 3.0).max(0.02);
    // With K = 1 the importance-weighted estimate is a one-sample ELBO.
    assert!(
        (mean(&nll1) - mean(&elbos)).abs() < noise,
        "K=1 {nll1:?} vs elbo {elbos:?}"
    );
    // More samples: a tighter bound, below the ELBO.
    let nll10 = num(&eval_json("10", "7", &[]), "nll");
    let nll100 = num(&eval_json("100", "8", &[]), "nll");
    assert!(
        nll100 <= mean(&elbos) + noise,
        "K=100 {nll100} vs elbo {}",
        mean(&elbos)
    );
    assert!(
        nll100 <= nll10 + noise && nll10 <= mean(&nll1) + noise,
        "{nll100} {nll10} {nll1:?}"
    );
    assert!(nll100 > 0.0);
}

/// The NLL's samples in bfloat16: the same estimate within rounding, on the same draws.
#[test]
fn bfloat16_samples_give_the_same_nll_within_rounding() {
    let at = |precision: &str| eval_json("10", "7", &["--precision", precision]);
    let (f32, bf16) = (at("f32"), at("bf16"));
    assert_eq!(
        (f32["iw_precision"].as_str(), bf16["iw_precision"].as_str()),
        (Some("f32"), Some("bf16"))
    );
    assert_eq!(
        f32["elbo"], bf16["elbo"],
        "only the NLL's samples change format"
    );
    assert!(
        (num(&f32, "nll") - num(&bf16, "nll")).abs() < 0.01 * num(&f32, "nll"),
        "{f32} {bf16}"
    );
}

/// `--refine` moves each code towards the z the decoder finds most likely for its sentence: the
/// objective it lowers is lower for every sentence's code taken together, 0 steps leave the
/// posterior means as they are, and the commands take the flag (and refuse it with sampling).
#[test]
fn refined_codes_explain_their_sentences_better() {
    use tch::Device;
    use textvae::{checkpoint, data, latent};
    let (_, ckpt) = model();
    let m = checkpoint::load(ckpt, Device::Cpu).unwrap();
    let corpus = data::read_corpus(&common::tiny_corpus()).unwrap();
    let seqs = latent::prepare_inputs(&m.tokenizer, &corpus, 64)
        .unwrap()
        .seqs;
    let (mu, _) = latent::encode(&m.vae, &seqs, 8, Device::Cpu);
    let same = latent::refine(&m.vae, &seqs, &mu, 0, 8, Device::Cpu).unwrap();
    assert_eq!(same, mu);
    let z = latent::refine(&m.vae, &seqs, &mu, 30, 8, Device::Cpu).unwrap();
    let objective = |z: &tch::Tensor| {
        latent::map_objective(&m.vae, &seqs, z, 8, Device::Cpu)
            .sum(tch::Kind::Double)
            .double_value(&[])
    };
    let (before, after) = (objective(&mu), objective(&z));
    assert!(after < before - 0.1, "objective {before} -> {after}");

    let file = common::tiny_corpus();
    let out = run(
        &["reconstruct", file.to_str().unwrap(), "--refine", "5"],
        None,
    );
    assert_eq!(out.ok().stdout.lines().count(), 20);
    run(
        &["reconstruct", "-", "--refine", "5", "--sample"],
        Some("a\n"),
    )
    .fails_with("cannot be used with");
    run(&["interpolate", "--prior", "--refine", "5"], None).fails_with("cannot be used with");
    let walk = run(
        &[
            "interpolate",
            "the cat sat on the mat .",
            "the dog ran .",
            "--refine",
            "5",
        ],
        None,
    );
    assert!(walk.ok().stdout.lines().count() >= 2);

    // `encode --refine` adds the refined code beside mu and logvar, the same one `refine` gives.
    let rows = json_lines(run(
        &[
            "encode",
            file.to_str().unwrap(),
            "--refine",
            "30",
            "--batch-size",
            "8",
        ],
        None,
    ));
    assert_eq!(rows.len(), 20);
    let first = |key: &str| rows[0][key].as_array().unwrap()[0].as_f64().unwrap();
    assert!((first("z") - z.double_value(&[0, 0])).abs() < 1e-4);
    assert!((first("mu") - mu.double_value(&[0, 0])).abs() < 1e-5);
    let tsv = run(
        &["encode", "-", "--format", "tsv", "--refine", "3"],
        Some("the cat sat on the mat .\n"),
    );
    assert_eq!(tsv.ok().stdout.trim_end().split('\t').count(), 4);
    let (dir, _) = model();
    let npy = dir.path().join("refined.npy");
    let path = npy.to_str().unwrap();
    run(
        &[
            "encode",
            file.to_str().unwrap(),
            "--format",
            "npy",
            "-o",
            path,
            "--refine",
            "3",
        ],
        None,
    )
    .ok();
    assert_eq!(tch::Tensor::read_npy(&npy).unwrap().size(), vec![20, 3, 8]);
}
