//! Install mode: put the plugin binary in the CNI bin dir and chain it last
//! in the node's primary network config, and undo both. Other plugins' entries
//! are kept as they were (key order preserved); files are replaced by rename
//! so the runtime never reads half a config.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::status::{InstallFailure, Status};

pub const PLUGIN_TYPE: &str = "istio-cni";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct InstallError {
    pub path: PathBuf,
    pub reason: String,
}

fn ierr(path: &Path, reason: impl ToString) -> InstallError {
    InstallError {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Replaces `to` with `bytes` through a temporary file and a rename.
fn write_atomic(to: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = to.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let tmp = to.with_file_name(format!(".{name}.istio-cni.tmp"));
    fs::write(&tmp, bytes).map_err(|e| ierr(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| ierr(&tmp, e))?;
    fs::rename(&tmp, to).map_err(|e| ierr(to, e))
}

/// Whether the ELF executable at `path` needs a dynamic loader (has a
/// PT_INTERP program header): such a plugin fails every ADD on a node whose
/// libc is older than the build machine's.
pub fn is_dynamic(path: &Path) -> Result<bool, InstallError> {
    const PT_INTERP: u32 = 3;
    let bytes = fs::read(path).map_err(|e| ierr(path, e))?;
    let not_elf = || ierr(path, "not a 64-bit little-endian ELF executable");
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = phoff + i * size;
        let kind = bytes.get(at..at + 4).ok_or_else(not_elf)?;
        if u32::from_le_bytes(kind.try_into().expect("4 bytes")) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Copies the plugin into `bin_dir` unless an identical copy is there.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = fs::read(src).map_err(|e| ierr(src, e))?;
    let dst = bin_dir.join(PLUGIN_TYPE);
    if fs::read(&dst).ok().as_deref() == Some(&bytes[..]) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir).map_err(|e| ierr(bin_dir, e))?;
    write_atomic(&dst, &bytes, 0o755)?;
    Ok(true)
}

/// The network config the runtime uses: the first by name, as it does.
pub fn primary_conf(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(|e| ierr(conf_dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str());
            !hidden && matches!(ext, Some("conflist" | "conf" | "json"))
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        ierr(
            conf_dir,
            "no CNI network config yet (the primary CNI writes one first)",
        )
    })
}

fn read_conf(path: &Path) -> Result<(Value, u32), InstallError> {
    let bytes = fs::read(path).map_err(|e| ierr(path, e))?;
    let mode = fs::metadata(path)
        .map_err(|e| ierr(path, e))?
        .permissions()
        .mode()
        & 0o7777;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| ierr(path, format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ierr(path, "not a JSON object"));
    }
    Ok((v, mode))
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Which network config the plugin is chained into.
#[derive(Debug, Clone)]
pub struct ConfTarget {
    pub dir: PathBuf,
    /// The file by name (Istio's `CNI_CONF_NAME`); None: the one the
    /// runtime uses, the first by name.
    pub name: Option<String>,
}

/// Chains `entry` last in the primary config (a plain `.conf` becomes a
/// `.conflist`). Returns the file and whether anything changed.
pub fn insert(conf_dir: &Path, entry: &Value) -> Result<(PathBuf, bool), InstallError> {
    insert_into(
        &ConfTarget {
            dir: conf_dir.to_path_buf(),
            name: None,
        },
        entry,
    )
}

/// `insert` into the file `target` names (which must exist: it is the
/// primary CNI's to write), or the primary one.
pub fn insert_into(target: &ConfTarget, entry: &Value) -> Result<(PathBuf, bool), InstallError> {
    let path = match &target.name {
        Some(name) => {
            let p = target.dir.join(name);
            if !p.exists() {
                return Err(ierr(
                    &p,
                    "CNI_CONF_NAME names no config yet (the primary CNI writes it first)",
                ));
            }
            p
        }
        None => primary_conf(&target.dir)?,
    };
    let (mut conf, mode) = read_conf(&path)?;
    let (target, wrapped) = if conf.get("plugins").is_some() {
        (path.clone(), false)
    } else {
        conf = json!({
            "cniVersion": conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
            "name": conf.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [conf],
        });
        (path.with_extension("conflist"), true)
    };
    let plugins = conf
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ierr(&path, "`plugins` is not a list"))?;
    let before = plugins.clone();
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    if !wrapped && *plugins == before {
        return Ok((target, false));
    }
    let text = serde_json::to_vec_pretty(&conf).expect("JSON serializes");
    write_atomic(&target, &text, mode)?;
    if wrapped {
        fs::remove_file(&path).map_err(|e| ierr(&path, e))?;
    }
    Ok((target, true))
}

/// Takes our entry out of every config in `conf_dir` and the binary out of
/// `bin_dir`. Files without our entry are not rewritten.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for e in fs::read_dir(conf_dir)
        .map_err(|e| ierr(conf_dir, e))?
        .flatten()
    {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("conflist") {
            continue;
        }
        let Ok((mut conf, mode)) = read_conf(&path) else {
            continue; // not ours to judge
        };
        let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let n = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != n {
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(&conf).expect("JSON"),
                mode,
            )?;
            changed.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ierr(&bin, e)),
        _ => {}
    }
    Ok(changed)
}

/// Keeps the plugin installed: re-copies a missing binary, re-chains a
/// config another writer rewrote without us. Polls, like the mesh config
/// watch, because config dirs are often replaced wholesale.
pub async fn keep_installed(
    plugin: PathBuf,
    bin_dir: PathBuf,
    conf: ConfTarget,
    entry: Value,
    status: std::sync::Arc<Status>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_error = String::new();
    loop {
        let result = install_binary(&plugin, &bin_dir)
            .map_err(|e| (InstallFailure::CopyBinary, e))
            .and_then(|copied| {
                let (path, chained) =
                    insert_into(&conf, &entry).map_err(|e| (InstallFailure::Config, e))?;
                Ok((copied, path, chained))
            });
        match result {
            Ok((copied, path, chained)) => {
                if copied || chained {
                    tracing::info!(conf = %path.display(), binary_copied = copied, chained, "istio-cni plugin installed");
                }
                status.installed(copied || chained);
                last_error.clear();
            }
            Err((why, e)) => {
                status.install_failed(why);
                if e.to_string() != last_error {
                    tracing::warn!(error = %e, "cannot install the CNI plugin yet; retrying");
                    last_error = e.to_string();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
