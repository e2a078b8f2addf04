//! Latent codes in files: what `textvae encode` writes (JSON lines, TSV, a float32 npy array)
//! and what `textvae decode` reads back — those, or vectors made elsewhere (a line of numbers, a
//! JSON array, an npy array [N, Z]), so that codes can be averaged, moved along a direction or
//! mixed outside textvae and turned into sentences again.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde_json::{json, Value};
use tch::{Device, Tensor};

use crate::data::Corpus;
use crate::latent;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EncodeFormat {
    Jsonl,
    Tsv,
    Npy,
}

/// Which of `encode`'s vectors a file gives for each sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Field {
    /// The posterior mean, what `reconstruct` decodes.
    Mu,
    /// The code refined by `encode --refine`.
    Z,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Mu => "mu",
            Field::Z => "z",
        }
    }

    /// What to say when a file lacks it.
    fn missing(self) -> &'static str {
        match self {
            Field::Mu => "",
            Field::Z => " (encode --refine writes it)",
        }
    }

    /// Where `encode` puts it among its vectors (mu, logvar, z): the TSV column after the text,
    /// the npy array's second axis.
    fn index(self) -> usize {
        match self {
            Field::Mu => 0,
            Field::Z => 2,
        }
    }
}

/// `codes` (mu, logvar and perhaps the refined z, each [N, Z]) as one float32 array [N, 2 or 3,
/// Z], written whole or not at all.
pub fn write_npy(path: &Path, codes: &[Tensor], latent_dim: i64) -> Result<()> {
    let all = Tensor::stack(codes, 1); // [N, 2 or 3, Z]
    crate::files::write_atomic_with(path, |tmp| {
        all.write_npy(tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })?;
    let size = all.size();
    eprintln!(
        "{}: {} sentences x {} x {latent_dim}",
        path.display(),
        size[0],
        size[1]
    );
    Ok(())
}

/// One line per sentence: a JSON object with "mu", "logvar" (and "z" when refined), or the
/// text and the vectors as tab-separated columns of space-separated numbers.
pub fn to_text(corpus: &Corpus, codes: &[Tensor], format: EncodeFormat) -> Result<String> {
    let rows = codes.iter().map(latent::rows).collect::<Result<Vec<_>>>()?;
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.6}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut text = String::new();
    for (i, line) in corpus.lines.iter().enumerate() {
        if let EncodeFormat::Jsonl = format {
            let mut obj = json!({"line": corpus.line_numbers[i], "text": line,
                "mu": rows[0][i], "logvar": rows[1][i]});
            if let Some(z) = rows.get(2) {
                obj["z"] = json!(z[i]);
            }
            text.push_str(&format!("{obj}\n"));
        } else {
            let columns: Vec<String> = rows.iter().map(|r| join(&r[i])).collect();
            text.push_str(&format!(
                "{}\t{}\n",
                line.replace('\t', " "),
                columns.join("\t")
            ));
        }
    }
    Ok(text)
}

/// Codes to decode, [N, Z] float32 on `device`, from a file (or standard input for `-` or
/// none): npy, known by its magic string whatever the file's name, or text, one code per line.
pub fn read(path: Option<&Path>, field: Field, latent_dim: i64, device: Device) -> Result<Tensor> {
    let (bytes, name) = match path {
        Some(p) if p != Path::new("-") => (
            std::fs::read(p).with_context(|| format!("reading codes from {}", p.display()))?,
            p.display().to_string(),
        ),
        _ => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading codes from standard input")?;
            (bytes, "standard input".to_string())
        }
    };
    let z = if bytes.starts_with(NPY_MAGIC) {
        read_npy(&bytes, field, latent_dim)
    } else {
        std::str::from_utf8(&bytes)
            .map_err(|e| anyhow::anyhow!("neither npy nor UTF-8 text ({e})"))
            .and_then(|text| parse_text(text, field, latent_dim))
    };
    Ok(z.with_context(|| name)?.to_device(device))
}

/// How every npy file starts.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// An npy array of floats: [N, Z], or `encode`'s [N, 2 or 3, Z] from which `field` is taken.
fn read_npy(bytes: &[u8], field: Field, latent_dim: i64) -> Result<Tensor> {
    let t = npy_floats(bytes)?;
    let ctx = || format!("shape {:?}", t.size());
    let z = match t.size().as_slice() {
        [_, _] => t.shallow_clone(),
        [_, k, _] if *k == 2 || *k == 3 => {
            let i = field.index() as i64;
            anyhow::ensure!(i < *k, "{}: no {}{}", ctx(), field.name(), field.missing());
            t.select(1, i) // [N, Z]
        }
        _ => anyhow::bail!(
            "{}: expected [N, {latent_dim}] or encode's [N, 2 or 3, {latent_dim}]",
            ctx()
        ),
    };
    let (n, width) = (z.size()[0], z.size()[1]);
    anyhow::ensure!(n > 0, "{}: no codes", ctx());
    anyhow::ensure!(
        width == latent_dim,
        "{}: codes of {width} numbers, but the model's z has {latent_dim}",
        ctx()
    );
    anyhow::ensure!(
        z.isfinite().all().int64_value(&[]) != 0,
        "{}: a code holds NaN or an infinity",
        ctx()
    );
    Ok(z.contiguous())
}

/// An npy file of float32 or float64 numbers, in either byte or axis order, as a float32 tensor
/// of its shape. Read through `npyz`, which checks the data against the header (libtorch's own
/// reader trusts the header's shape and reads past the end of a short file).
fn npy_floats(bytes: &[u8]) -> Result<Tensor> {
    let npy = npyz::NpyFile::new(bytes).context("reading npy")?;
    let shape = npy
        .shape()
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<Result<Vec<i64>, _>>()
        .with_context(|| format!("shape {:?} out of range", npy.shape()))?;
    let fortran = npy.order() == npyz::Order::Fortran;
    let descr = npy.dtype().descr();
    let data_ctx = || format!("fewer numbers than its shape {shape:?}");
    let floats: Vec<f32> = match npy.try_data::<f32>() {
        Ok(data) => data
            .collect::<std::io::Result<_>>()
            .with_context(data_ctx)?,
        Err(npy) => match npy.try_data::<f64>() {
            Ok(data) => data
                .map(|x| x.map(|x| x as f32))
                .collect::<std::io::Result<_>>()
                .with_context(data_ctx)?,
            Err(_) => anyhow::bail!("numbers of type {descr}; decode reads float32 or float64"),
        },
    };
    let t = Tensor::from_slice(&floats);
    let shaped = if fortran {
        // Stored with the first axis fastest: the reversed shape in C order, transposed back.
        let reversed: Vec<i64> = shape.iter().rev().copied().collect();
        let dims: Vec<i64> = (0..shape.len() as i64).rev().collect();
        t.f_view(reversed.as_slice())
            .and_then(|t| t.f_permute(dims.as_slice()))
    } else {
        t.f_view(shape.as_slice())
    };
    shaped.with_context(|| format!("shape {shape:?}"))
}

/// One code per non-blank line (blank lines are skipped): [N, Z].
pub fn parse_text(text: &str, field: Field, latent_dim: i64) -> Result<Tensor> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let row = parse_line(line, field)
            .and_then(|row| check(row, latent_dim))
            .with_context(|| format!("line {}", i + 1))?;
        rows.push(row);
    }
    anyhow::ensure!(!rows.is_empty(), "no codes");
    Ok(latent::to_tensor(&rows, Device::Cpu))
}

/// `encode`'s JSON object (its `field`), a JSON array, `encode`'s TSV (text, mu, logvar, z) or
/// numbers separated by spaces or commas.
fn parse_line(line: &str, field: Field) -> Result<Vec<f64>> {
    if line.starts_with('{') || line.starts_with('[') {
        let v: Value = serde_json::from_str(line).context("not valid JSON")?;
        let numbers = match &v {
            Value::Object(obj) => obj
                .get(field.name())
                .with_context(|| format!("no \"{}\" field{}", field.name(), field.missing()))?,
            _ => &v,
        };
        let Value::Array(items) = numbers else {
            anyhow::bail!("\"{}\" is not an array of numbers", field.name());
        };
        return items
            .iter()
            .map(|x| x.as_f64().context("a code's entries must be numbers"))
            .collect();
    }
    let numbers = match line.split('\t').collect::<Vec<_>>().as_slice() {
        [one] => *one,
        columns => columns
            .get(1 + field.index())
            .with_context(|| format!("no {} column{}", field.name(), field.missing()))?,
    };
    numbers
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<f64>()
                .map_err(|_| anyhow::anyhow!("{s:?} is not a number"))
        })
        .collect()
}

fn check(row: Vec<f64>, latent_dim: i64) -> Result<Vec<f64>> {
    anyhow::ensure!(
        row.len() as i64 == latent_dim,
        "a code of {} numbers, but the model's z has {latent_dim}",
        row.len()
    );
    anyhow::ensure!(
        row.iter().all(|x| x.is_finite()),
        "a code holds NaN or an infinity"
    );
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str, field: Field, z: i64) -> Result<Vec<Vec<f64>>> {
        latent::rows(&parse_text(text, field, z)?)
    }

    #[test]
    fn every_format_encode_writes_and_plain_numbers_are_read() {
        let text = concat!(
            "{\"line\": 1, \"text\": \"a b\", \"mu\": [1, 2], \"logvar\": [0, 0], \"z\": [5, 6]}\n",
            "\n",
            "a b\t1 2\t0 0\t5 6\n",
            "[1.5, -2]\n",
            "3, 4\n",
            "  7   5e-1 \n",
        );
        let mu = rows(text, Field::Mu, 2).unwrap();
        assert_eq!(
            mu,
            vec![
                vec![1.0, 2.0],
                vec![1.0, 2.0],
                vec![1.5, -2.0],
                vec![3.0, 4.0],
                vec![7.0, 0.5]
            ]
        );
        let z = rows(text, Field::Z, 2).unwrap();
        assert_eq!(z[0], vec![5.0, 6.0]);
        assert_eq!(z[1], vec![5.0, 6.0]);
        assert_eq!(
            z[2],
            vec![1.5, -2.0],
            "a bare vector is the code whatever the field"
        );
    }

    #[test]
    fn bad_codes_name_their_line() {
        let err =
            |text: &str, field: Field| format!("{:#}", parse_text(text, field, 2).unwrap_err());
        assert_eq!(
            err("1 2\n1 2 3\n", Field::Mu),
            "line 2: a code of 3 numbers, but the model's z has 2"
        );
        assert_eq!(err("1 x\n", Field::Mu), "line 1: \"x\" is not a number");
        assert_eq!(
            err("1 NaN\n", Field::Mu),
            "line 1: a code holds NaN or an infinity"
        );
        assert!(err("{\"mu\": [1, 2]}\n", Field::Z).starts_with("line 1: no \"z\" field"));
        assert!(err("a\t1 2\t0 0\n", Field::Z).starts_with("line 1: no z column"));
        assert!(err("{\"mu\": [1, \"2\"]}\n", Field::Mu).contains("must be numbers"));
        assert!(err("{\"mu\": 3}\n", Field::Mu).contains("not an array"));
        assert!(err("[1, 2\n", Field::Mu).contains("not valid JSON"));
        assert_eq!(err("\n \n", Field::Mu), "no codes");
    }
}
