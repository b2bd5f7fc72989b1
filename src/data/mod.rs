//! Labelled text data for sequence classification (CPU only): JSON arrays, JSONL, CSV and TSV files with
//! configurable text and label columns, label maps, seeded splits, length-bucketed batches, and the
//! accuracy / macro-F1 metrics.
//!
//! The default task is the UCI "Sentiment Labelled Sentences" set (Kotzias, Denil, de Freitas, Smyth,
//! "From Group to Individual Labels using Deep Features", KDD 2015; CC BY 4.0) as shipped in the npm
//! package `sentiment@5.0.2` (`test/fixtures/{imdb,yelp,amazon}.json`): train on imdb + yelp (2,000
//! sentences), test on amazon (1,000). Each of those files ends with a blank record
//! `{"text": "", "class": null}`; a record with empty text *and* no label is skipped everywhere, while
//! empty text with a label, or text without a label, is an error.
//!
//! Every error names the file and the line (JSONL/CSV/TSV) or record (JSON array) at fault.

use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The file format, from the extension (`.json`, `.jsonl`/`.ndjson`, `.csv`, `.tsv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Jsonl,
    Csv,
    Tsv,
}

impl Format {
    /// The format named by `path`'s extension.
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("json") => Ok(Format::Json),
            Some("jsonl" | "ndjson") => Ok(Format::Jsonl),
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            _ => Err(Error::format(
                path.display().to_string(),
                "unknown data format: the extension must be .json, .jsonl, .ndjson, .csv or .tsv",
            )),
        }
    }
}

/// Which columns (JSON keys or CSV/TSV header names) hold the text and the label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    pub text: String,
    pub label: String,
}

impl Default for Columns {
    /// `text` and `class` (the demo task's keys).
    fn default() -> Self {
        Columns {
            text: "text".into(),
            label: "class".into(),
        }
    }
}

/// One raw record: its text, its label as written (integers as decimal strings), and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub text: String,
    pub label: String,
    /// "line N" or "record N" (1-based).
    pub location: String,
}

/// Label names ↔ ids. Saved next to an adapter as `label_map.json` (`{"labels": [name of id 0, ...]}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMap {
    pub labels: Vec<String>,
}

impl LabelMap {
    /// The map of a set of label strings: numeric order when every label is an integer, else sorted by
    /// name. Duplicates collapse.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a str>) -> LabelMap {
        let mut v: Vec<String> = labels.into_iter().map(str::to_string).collect();
        v.sort();
        v.dedup();
        if v.iter().all(|l| l.parse::<i64>().is_ok()) {
            v.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
        }
        LabelMap { labels: v }
    }

    /// The id of `label`, if known.
    pub fn id(&self, label: &str) -> Option<u32> {
        self.labels.iter().position(|l| l == label).map(|i| i as u32)
    }

    /// The name of `id`.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.labels.get(id as usize).map(String::as_str)
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Writes `dir/label_map.json`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let path = dir.as_ref().join("label_map.json");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::invalid(format!("label map: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }

    /// Reads `dir/label_map.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<LabelMap> {
        let path = dir.as_ref().join("label_map.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: LabelMap = serde_json::from_str(&text)
            .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
        if m.labels.is_empty() {
            return Err(Error::format(path.display().to_string(), "no labels"));
        }
        Ok(m)
    }
}

/// Labelled examples with their label map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub texts: Vec<String>,
    /// Label ids, `< labels.len()`.
    pub labels: Vec<u32>,
    pub label_map: LabelMap,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The examples at `idx`, with the same label map.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            texts: idx.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            label_map: self.label_map.clone(),
        }
    }

    /// A seeded split: a shuffled `test_fraction` (in (0, 1)) of the examples becomes the second set.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::invalid(format!(
                "split fraction must be in (0, 1), got {test_fraction}"
            )));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut idx, &mut Rng::new(seed));
        let n_test = ((self.len() as f64) * test_fraction).round() as usize;
        if n_test == 0 || n_test == self.len() {
            return Err(Error::invalid(format!(
                "split {test_fraction} of {} examples leaves one side empty",
                self.len()
            )));
        }
        let (test, train) = idx.split_at(n_test);
        Ok((self.subset(train), self.subset(test)))
    }
}

/// Reads the raw records of `path` (format from the extension). Blank records (empty text and a
/// missing/null/empty label) are skipped.
pub fn read_records(path: impl AsRef<Path>, cols: &Columns) -> Result<Vec<RawRecord>> {
    let path = path.as_ref();
    let format = Format::from_path(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        err(path, &format!("line {line}"), "is not valid UTF-8")
    })?;
    let rows = match format {
        Format::Json => read_json(path, &text, cols)?,
        Format::Jsonl => read_jsonl(path, &text, cols)?,
        Format::Csv => read_delimited(path, &text, cols, b',')?,
        Format::Tsv => read_delimited(path, &text, cols, b'\t')?,
    };
    let mut out = Vec::with_capacity(rows.len());
    for (text, label, location) in rows {
        let text_empty = text.trim().is_empty();
        match (text_empty, label) {
            (true, None) => continue,
            (true, Some(_)) => return Err(err(path, &location, "has an empty text")),
            (false, None) => {
                return Err(err(
                    path,
                    &location,
                    &format!("has no label (column {:?})", cols.label),
                ));
            }
            (false, Some(label)) => out.push(RawRecord {
                text,
                label,
                location,
            }),
        }
    }
    if out.is_empty() {
        return Err(Error::format(path.display().to_string(), "no labelled records"));
    }
    Ok(out)
}

/// Loads a training file: its label map is built from its own labels.
pub fn load_train(path: impl AsRef<Path>, cols: &Columns) -> Result<Dataset> {
    let recs = read_records(&path, cols)?;
    let label_map = LabelMap::from_labels(recs.iter().map(|r| r.label.as_str()));
    if label_map.len() < 2 {
        return Err(Error::format(
            path.as_ref().display().to_string(),
            format!("needs at least two distinct labels, found {:?}", label_map.labels),
        ));
    }
    with_map(path.as_ref(), recs, label_map)
}

/// Loads an evaluation file against an existing label map: an unknown label is an error naming the
/// file and line.
pub fn load_with_map(path: impl AsRef<Path>, cols: &Columns, label_map: &LabelMap) -> Result<Dataset> {
    let recs = read_records(&path, cols)?;
    with_map(path.as_ref(), recs, label_map.clone())
}

/// Loads several training files as one (the label map covers all of them).
pub fn load_train_files(paths: &[PathBuf], cols: &Columns) -> Result<Dataset> {
    let mut all = Vec::new();
    for p in paths {
        all.push((p.clone(), read_records(p, cols)?));
    }
    let label_map = LabelMap::from_labels(all.iter().flat_map(|(_, r)| r.iter().map(|x| x.label.as_str())));
    if label_map.len() < 2 {
        return Err(Error::invalid(format!(
            "training data needs at least two distinct labels, found {:?}",
            label_map.labels
        )));
    }
    let mut ds = Dataset {
        texts: Vec::new(),
        labels: Vec::new(),
        label_map: label_map.clone(),
    };
    for (p, recs) in all {
        let d = with_map(&p, recs, label_map.clone())?;
        ds.texts.extend(d.texts);
        ds.labels.extend(d.labels);
    }
    Ok(ds)
}

/// The demo task under `root` (`root/sentiment/{imdb,yelp,amazon}.json`): (train = imdb + yelp,
/// test = amazon).
pub fn demo_sentiment(root: impl AsRef<Path>) -> Result<(Dataset, Dataset)> {
    let dir = root.as_ref().join("sentiment");
    let cols = Columns::default();
    let train = load_train_files(&[dir.join("imdb.json"), dir.join("yelp.json")], &cols)?;
    let test = load_with_map(dir.join("amazon.json"), &cols, &train.label_map)?;
    Ok((train, test))
}

fn with_map(path: &Path, recs: Vec<RawRecord>, label_map: LabelMap) -> Result<Dataset> {
    let mut texts = Vec::with_capacity(recs.len());
    let mut labels = Vec::with_capacity(recs.len());
    for r in recs {
        let id = label_map.id(&r.label).ok_or_else(|| {
            err(
                path,
                &r.location,
                &format!(
                    "has label {:?}, not one of the training labels {:?}",
                    r.label, label_map.labels
                ),
            )
        })?;
        texts.push(r.text);
        labels.push(id);
    }
    Ok(Dataset {
        texts,
        labels,
        label_map,
    })
}

fn err(path: &Path, location: &str, msg: &str) -> Error {
    Error::format(format!("{}, {location}", path.display()), msg.to_string())
}

type Row = (String, Option<String>, String);

fn label_string(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

fn json_row(path: &Path, v: &Value, cols: &Columns, location: String) -> Result<Row> {
    let Value::Object(o) = v else {
        return Err(err(path, &location, "is not a JSON object"));
    };
    let text = match o.get(&cols.text) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => String::new(),
        Some(_) => {
            return Err(err(
                path,
                &location,
                &format!("column {:?} is not a string", cols.text),
            ));
        }
        None => return Err(err(path, &location, &format!("has no column {:?}", cols.text))),
    };
    let label = match o.get(&cols.label) {
        Some(v) => label_string(v),
        None if text.trim().is_empty() => None,
        None => return Err(err(path, &location, &format!("has no column {:?}", cols.label))),
    };
    Ok((text, label, location))
}

fn read_json(path: &Path, text: &str, cols: &Columns) -> Result<Vec<Row>> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        err(
            path,
            &format!("line {}", e.line()),
            &format!("is not a JSON array of records ({e})"),
        )
    })?;
    let Value::Array(items) = v else {
        return Err(err(path, "line 1", "is not a JSON array of records"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| json_row(path, v, cols, format!("record {}", i + 1)))
        .collect()
}

fn read_jsonl(path: &Path, text: &str, cols: &Columns) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("line {}", i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| err(path, &loc, &format!("is not a JSON object ({e})")))?;
        out.push(json_row(path, &v, cols, loc)?);
    }
    Ok(out)
}

fn read_delimited(path: &Path, text: &str, cols: &Columns, delim: u8) -> Result<Vec<Row>> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delim)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| err(path, "line 1", &format!("has no readable header ({e})")))?
        .clone();
    let find = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
            err(
                path,
                "line 1",
                &format!(
                    "header has no column {name:?} (columns: {:?})",
                    headers.iter().collect::<Vec<_>>()
                ),
            )
        })
    };
    let (ti, li) = (find(&cols.text)?, find(&cols.label)?);
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            err(path, &format!("line {line}"), &format!("is malformed ({e})"))
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let text = rec.get(ti).unwrap_or("").to_string();
        let label = rec
            .get(li)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string);
        out.push((text, label, format!("line {line}")));
    }
    Ok(out)
}

/// Fisher–Yates shuffle from `rng`.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Batches of example indices with length bucketing: the indices are shuffled (seeded), cut into
/// chunks of `batch_size * chunk_batches`, each chunk is sorted by `lengths` and cut into batches, and
/// the batches are shuffled, so each batch pads to similar lengths while the order stays random. Every
/// index appears exactly once; only the last batch may be short.
pub fn bucketed_batches(
    lengths: &[usize],
    batch_size: usize,
    chunk_batches: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if batch_size == 0 || chunk_batches == 0 {
        return Err(Error::invalid("batch size and chunk size must be positive"));
    }
    let mut rng = Rng::new(seed);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut idx, &mut rng);
    let mut batches = Vec::new();
    for chunk in idx.chunks_mut(batch_size * chunk_batches) {
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    Ok(batches)
}

/// Batches for evaluation: indices sorted by length (least padding), in order.
pub fn sorted_batches(lengths: &[usize], batch_size: usize) -> Result<Vec<Vec<usize>>> {
    if batch_size == 0 {
        return Err(Error::invalid("batch size must be positive"));
    }
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.sort_by_key(|&i| lengths[i]);
    Ok(idx.chunks(batch_size).map(<[usize]>::to_vec).collect())
}

/// Accuracy and macro-F1 (mean over the `n_classes` classes of 2·P·R/(P+R), 0 for a class with no
/// true or predicted examples, as scikit-learn's `f1_score(average="macro", zero_division=0)`).
pub fn accuracy_f1(pred: &[u32], gold: &[u32], n_classes: usize) -> Result<(f64, f64)> {
    if pred.len() != gold.len() || pred.is_empty() {
        return Err(Error::invalid(format!(
            "metrics: {} predictions for {} labels",
            pred.len(),
            gold.len()
        )));
    }
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    let mut f1 = 0.0;
    for c in 0..n_classes as u32 {
        let tp = pred.iter().zip(gold).filter(|&(&p, &g)| p == c && g == c).count() as f64;
        let fp = pred.iter().zip(gold).filter(|&(&p, &g)| p == c && g != c).count() as f64;
        let fn_ = pred.iter().zip(gold).filter(|&(&p, &g)| p != c && g == c).count() as f64;
        let denom = 2.0 * tp + fp + fn_;
        f1 += if denom > 0.0 { 2.0 * tp / denom } else { 0.0 };
    }
    Ok((correct as f64 / pred.len() as f64, f1 / n_classes.max(1) as f64))
}
