//! Data loading (JSON, JSONL, CSV, TSV), label maps, splits, bucketed batches and metrics.

use peft_kernels::data::{self, Columns, LabelMap};
use std::path::PathBuf;

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of(r: peft_kernels::Result<data::Dataset>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn same_data_in_four_formats() {
    let d = tempfile::tempdir().unwrap();
    let cols = Columns::default();
    let json = write(
        &d,
        "a.json",
        br#"[{"text":"good","class":1},{"text":"bad","class":0},{"text":"","class":null}]"#,
    );
    let jsonl = write(
        &d,
        "a.jsonl",
        b"{\"text\":\"good\",\"class\":1}\n\n{\"text\":\"bad\",\"class\":0}\n",
    );
    let csv = write(&d, "a.csv", b"class,text\n1,good\n0,\"bad\"\n");
    let tsv = write(&d, "a.tsv", b"text\tclass\ngood\t1\nbad\t0\n");
    for p in [json, jsonl, csv, tsv] {
        let ds = data::load_train(&p, &cols).unwrap();
        assert_eq!(ds.texts, ["good", "bad"], "{p:?}");
        assert_eq!(ds.labels, [1, 0], "{p:?}");
        assert_eq!(ds.label_map.labels, ["0", "1"]);
    }
}

#[test]
fn named_labels_and_custom_columns() {
    let d = tempfile::tempdir().unwrap();
    let cols = Columns {
        text: "sentence".into(),
        label: "sentiment".into(),
    };
    let p = write(
        &d,
        "b.csv",
        b"sentence,sentiment\nnice,pos\nawful,neg\nmeh,neutral\n",
    );
    let ds = data::load_train(&p, &cols).unwrap();
    assert_eq!(ds.label_map.labels, ["neg", "neutral", "pos"]);
    assert_eq!(ds.labels, [2, 0, 1]);
    // Integers sort numerically, not as strings.
    let m = LabelMap::from_labels(["10", "2", "1"]);
    assert_eq!(m.labels, ["1", "2", "10"]);
    // The map round-trips through label_map.json.
    ds.label_map.save(d.path()).unwrap();
    assert_eq!(LabelMap::load(d.path()).unwrap(), ds.label_map);
}

#[test]
fn bad_data_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cols = Columns::default();
    let train = data::load_train(
        write(
            &d,
            "t.jsonl",
            b"{\"text\":\"a\",\"class\":0}\n{\"text\":\"b\",\"class\":1}\n",
        ),
        &cols,
    )
    .unwrap();

    let e = err_of(data::load_train(write(&d, "m.csv", b"text,label\na,0\n"), &cols));
    assert!(
        e.contains("m.csv") && e.contains("line 1") && e.contains("\"class\""),
        "{e}"
    );

    let e = err_of(data::load_with_map(
        write(
            &d,
            "u.jsonl",
            b"{\"text\":\"a\",\"class\":0}\n{\"text\":\"b\",\"class\":7}\n",
        ),
        &cols,
        &train.label_map,
    ));
    assert!(
        e.contains("u.jsonl") && e.contains("line 2") && e.contains("\"7\""),
        "{e}"
    );

    let e = err_of(data::load_train(
        write(&d, "e.tsv", b"text\tclass\nok\t1\n  \t0\n"),
        &cols,
    ));
    assert!(
        e.contains("e.tsv") && e.contains("line 3") && e.contains("empty text"),
        "{e}"
    );

    let e = err_of(data::load_train(
        write(&d, "n.csv", b"text,class\nok,1\n\xff\xfe,0\n"),
        &cols,
    ));
    assert!(
        e.contains("n.csv") && e.contains("line 3") && e.contains("UTF-8"),
        "{e}"
    );

    // JSONL content in a .json file, and a CSV in a .jsonl file.
    let e = err_of(data::load_train(
        write(
            &d,
            "x.json",
            b"{\"text\":\"a\",\"class\":0}\n{\"text\":\"b\",\"class\":1}\n",
        ),
        &cols,
    ));
    assert!(e.contains("x.json") && e.contains("line 2"), "{e}");
    let e = err_of(data::load_train(
        write(&d, "y.jsonl", b"text,class\na,0\n"),
        &cols,
    ));
    assert!(e.contains("y.jsonl") && e.contains("line 1"), "{e}");

    let e = err_of(data::load_train(
        write(&d, "r.json", br#"[{"text":"a","class":0},{"text":"b"}]"#),
        &cols,
    ));
    assert!(e.contains("r.json") && e.contains("record 2"), "{e}");

    let e = err_of(data::load_train(write(&d, "z.txt", b"a"), &cols));
    assert!(e.contains("z.txt"), "{e}");

    let e = err_of(data::load_train(
        write(&d, "one.csv", b"text,class\na,0\nb,0\n"),
        &cols,
    ));
    assert!(e.contains("two distinct labels"), "{e}");
}

#[test]
fn split_is_seeded_and_disjoint() {
    let ds = data::Dataset {
        texts: (0..100).map(|i| format!("t{i}")).collect(),
        labels: (0..100).map(|i| i % 2).collect(),
        label_map: LabelMap::from_labels(["0", "1"]),
    };
    let (a, b) = ds.split(0.2, 7).unwrap();
    assert_eq!((a.len(), b.len()), (80, 20));
    let (a2, b2) = ds.split(0.2, 7).unwrap();
    assert_eq!((&a, &b), (&a2, &b2));
    let (_, b3) = ds.split(0.2, 8).unwrap();
    assert_ne!(b, b3);
    let mut all: Vec<_> = a.texts.iter().chain(&b.texts).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100);
    assert!(ds.split(0.0, 1).is_err() && ds.split(1.0, 1).is_err() && ds.split(f64::NAN, 1).is_err());
}

#[test]
fn bucketed_batches_cover_once_and_bucket() {
    let lengths: Vec<usize> = (0..203).map(|i| (i * 37) % 61 + 1).collect();
    let b = data::bucketed_batches(&lengths, 16, 4, 3).unwrap();
    let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..203).collect::<Vec<_>>());
    assert_eq!(b.iter().filter(|x| x.len() != 16).count(), 1);
    // Within a batch, lengths are sorted (each batch comes from one sorted chunk).
    for x in &b {
        assert!(x.windows(2).all(|w| lengths[w[0]] <= lengths[w[1]]));
    }
    // Bucketing pads less than random batches: total padded tokens below the unsorted order's.
    let padded = |bs: &[Vec<usize>]| -> usize {
        bs.iter()
            .map(|x| x.len() * x.iter().map(|&i| lengths[i]).max().unwrap())
            .sum()
    };
    let plain: Vec<Vec<usize>> = (0..203)
        .collect::<Vec<_>>()
        .chunks(16)
        .map(<[usize]>::to_vec)
        .collect();
    assert!(padded(&b) < padded(&plain));
    assert_eq!(b, data::bucketed_batches(&lengths, 16, 4, 3).unwrap());
    assert_ne!(b, data::bucketed_batches(&lengths, 16, 4, 4).unwrap());
    assert!(data::bucketed_batches(&lengths, 0, 4, 3).is_err());
    let s = data::sorted_batches(&lengths, 10).unwrap();
    assert_eq!(s.iter().map(Vec::len).sum::<usize>(), 203);
}

#[test]
fn accuracy_and_macro_f1() {
    // Class 0: tp 2, fp 1, fn 1 -> f1 2*2/(4+1+1) = 2/3; class 1: tp 1, fp 1, fn 1 -> 2/4 = 1/2.
    let (acc, f1) = data::accuracy_f1(&[0, 0, 1, 0, 1], &[0, 0, 1, 1, 0], 2).unwrap();
    assert!((acc - 0.6).abs() < 1e-12);
    assert!((f1 - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
    assert!(data::accuracy_f1(&[0], &[0, 1], 2).is_err());
}

#[test]
fn demo_task_when_present() {
    let root = std::env::var_os("PEFT_KERNELS_DEMO_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-kernels/demo")));
    let Some(root) = root.filter(|r| r.join("sentiment/amazon.json").exists()) else {
        println!("SKIPPED (demo data missing: run scripts/fetch-demo.sh)");
        return;
    };
    let (train, test) = data::demo_sentiment(&root).unwrap();
    assert_eq!((train.len(), test.len()), (2000, 1000));
    assert_eq!(train.label_map.labels, ["0", "1"]);
    assert_eq!(train.labels.iter().filter(|&&l| l == 1).count(), 1000);
}
