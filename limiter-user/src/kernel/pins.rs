//! What limiter leaves in bpffs so that enforcement outlives the daemon:
//!
//! ```text
//! <bpffs>/v<layout>/maps/<NAME>                  every map (counts, config)
//! <bpffs>/v<layout>/links/xdp@<iface>@<mode>     one XDP link per interface
//! <bpffs>/v<layout>/links/sock_ops@<cgroup ino>  the sock_ops link
//! ```
//!
//! The layout version is part of the path: a daemon never reuses the maps
//! of another layout (see `limiter_common::maps::MAP_LAYOUT_VERSION`).

use std::{
    io,
    path::{Path, PathBuf},
};

use limiter_common::maps::MAP_LAYOUT_VERSION;

use super::modes::AttachedMode;

/// The pin directory of this map layout.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    dir: PathBuf,
}

/// Why pins cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error(
        "{path} holds pins of map layout v{found}, and this limiter uses v{MAP_LAYOUT_VERSION}: stop the limiter that made them, then remove them with `limiter detach --bpffs {root}`"
    )]
    OtherLayout {
        path: PathBuf,
        root: PathBuf,
        found: String,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PinsError + '_ {
    move |source| PinsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `v<k>` directories under `root`.
fn versions(root: &Path) -> Result<Vec<(String, PathBuf)>, PinsError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix('v')
            && !version.is_empty()
            && version.chars().all(|c| c.is_ascii_digit())
        {
            out.push((version.to_string(), entry.path()));
        }
    }
    Ok(out)
}

impl PinDir {
    /// The pins of this layout under `root`; refuses pins of another layout.
    pub fn open(root: &Path) -> Result<PinDir, PinsError> {
        for (version, path) in versions(root)? {
            if version != MAP_LAYOUT_VERSION.to_string() {
                return Err(PinsError::OtherLayout {
                    path,
                    root: root.to_path_buf(),
                    found: version,
                });
            }
        }
        Ok(PinDir {
            root: root.to_path_buf(),
            dir: root.join(format!("v{MAP_LAYOUT_VERSION}")),
        })
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), PinsError> {
        for dir in [self.maps(), self.links()] {
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(())
    }

    /// The directory of this layout.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a daemon left its maps here.
    pub fn has_maps(&self) -> bool {
        self.maps().is_dir()
            && std::fs::read_dir(self.maps()).is_ok_and(|mut entries| entries.next().is_some())
    }

    pub fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Where the XDP link of `iface` attached in `mode` is pinned.
    pub fn xdp_link(&self, iface: &str, mode: AttachedMode) -> PathBuf {
        self.links().join(format!("xdp@{iface}@{}", mode.name()))
    }

    /// The pinned XDP links: (interface, mode, path).
    pub fn xdp_links(&self) -> Vec<(String, AttachedMode, PathBuf)> {
        self.link_entries()
            .into_iter()
            .filter_map(|(name, path)| {
                let rest = name.strip_prefix("xdp@")?;
                let (iface, mode) = rest.rsplit_once('@')?;
                let mode = match mode {
                    "driver" => AttachedMode::Driver,
                    "generic" => AttachedMode::Generic,
                    _ => return None,
                };
                Some((iface.to_string(), mode, path))
            })
            .collect()
    }

    /// Where the sock_ops link on the cgroup with inode `cgroup` is pinned.
    pub fn sock_ops_link(&self, cgroup: u64) -> PathBuf {
        self.links().join(format!("sock_ops@{cgroup}"))
    }

    /// The pinned sock_ops links: (cgroup inode, path).
    pub fn sock_ops_links(&self) -> Vec<(u64, PathBuf)> {
        self.link_entries()
            .into_iter()
            .filter_map(|(name, path)| {
                let ino = name.strip_prefix("sock_ops@")?.parse().ok()?;
                Some((ino, path))
            })
            .collect()
    }

    fn link_entries(&self) -> Vec<(String, PathBuf)> {
        std::fs::read_dir(self.links())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes this layout's pins: the links first (which detaches the
    /// programs, unless something else holds them), then the maps.
    pub fn remove(&self) -> Result<(), PinsError> {
        remove_version(&self.dir)
    }

    /// What the links pinned here attach, for people.
    pub fn describe(&self) -> String {
        let mut what: Vec<String> = self
            .xdp_links()
            .into_iter()
            .map(|(iface, mode, _)| format!("XDP on {iface} ({})", mode.name()))
            .collect();
        what.extend(
            self.sock_ops_links()
                .into_iter()
                .map(|(ino, _)| format!("sock_ops on the cgroup with inode {ino}")),
        );
        if what.is_empty() {
            "maps only, nothing attached".to_string()
        } else {
            what.join(", ")
        }
    }

    /// The root given to `--bpffs`.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn remove_version(dir: &Path) -> Result<(), PinsError> {
    let links = dir.join("links");
    if links.is_dir() {
        for entry in std::fs::read_dir(&links).map_err(io_error(&links))? {
            let path = entry.map_err(io_error(&links))?.path();
            std::fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dir)(e)),
    }
}

/// `limiter detach`: removes the pins of every layout under `root`, which
/// detaches the programs of a daemon that is gone. Returns what it removed.
pub fn remove_all(root: &Path) -> Result<Vec<PathBuf>, PinsError> {
    let mut removed = Vec::new();
    for (_, path) in versions(root)? {
        remove_version(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_layouts_are_refused() {
        let root = std::env::temp_dir().join(format!("limiter-pins-{}", std::process::id()));
        std::fs::create_dir_all(root.join("v0/maps")).unwrap();
        let e = PinDir::open(&root).unwrap_err().to_string();
        assert!(
            e.contains("map layout v0") && e.contains("limiter detach --bpffs"),
            "{e}"
        );
        assert_eq!(remove_all(&root).unwrap().len(), 1);
        let pins = PinDir::open(&root).unwrap();
        assert!(!pins.has_maps());
        pins.create().unwrap();
        std::fs::write(pins.links().join("xdp@eth0@driver"), b"").unwrap();
        std::fs::write(pins.links().join("sock_ops@4242"), b"").unwrap();
        assert_eq!(pins.xdp_links()[0].0, "eth0");
        assert_eq!(pins.xdp_links()[0].1, AttachedMode::Driver);
        assert_eq!(pins.sock_ops_links()[0].0, 4242);
        pins.remove().unwrap();
        assert!(!pins.dir().exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
