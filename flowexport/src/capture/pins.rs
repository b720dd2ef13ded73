//! State that outlives the agent process (`--pin-dir`).
//!
//! Every map of the kernel object and every program attachment (a BPF link
//! per interface and hook) is pinned in a directory of a BPF filesystem:
//!
//! ```text
//! /sys/fs/bpf/flowexport/TABLE, CACHE, CONTROL, ...   maps, by name
//! /sys/fs/bpf/flowexport/link:xdp:eth0                 XDP ingress on eth0
//! /sys/fs/bpf/flowexport/link:tc-egress:eth0           TC egress on eth0
//! ```
//!
//! While pinned, maps keep their counts and links keep the programs
//! counting, with or without an agent: after `kill -9`, during a restart
//! (`--keep-attached`) or an upgrade. The next agent finds them and adopts
//! them if they are of its layout ([`flowexport_common::LAYOUT_VERSION`],
//! and the same table, cache and ring sizes, kept in `CONTROL`): it opens
//! the maps, replaces the program behind each link with its own (atomic:
//! not a packet uncounted), continues the drain epoch and finishes the
//! exports that were in progress (kept in `PENDING`). Otherwise it refuses,
//! saying what to do.
//!
//! One agent at a time: the directory is locked (`flock`) for as long as an
//! agent runs; the PID of the holder is in `CONTROL`, for the error message.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData};
use flowexport_common::{
    CONTROL_CACHE_SLOTS, CONTROL_LAYOUT, CONTROL_OWNER_PID, CONTROL_RING_BYTES, CONTROL_SLOTS,
    LAYOUT_VERSION, MAPS, MAP_CONTROL,
};

/// `statfs().f_type` of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "--pin-dir {0}: not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`, \
         which scripts/setup.sh does; `ip netns exec` and containers see a /sys without it), \
         choose a directory on one, or pin nothing (`--pin-dir none`: the counts then end \
         with the agent)"
    )]
    NotBpfFs(PathBuf),
    #[error("--pin-dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "--pin-dir {path} is in use by another flowexport agent{}; stop it, or give this one \
         another --pin-dir",
        .pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
    )]
    Busy { path: PathBuf, pid: Option<u32> },
    #[error(
        "--pin-dir {path} holds the maps of another flowexport version (layout {found}, this \
         agent reads layout {LAYOUT_VERSION}); this agent cannot read its counts. Let that \
         version finish them (its `flowexport agent --pin-dir {path} --detach` exports every \
         flow and removes the pins), or discard them (`rm -r {path}`: their counts are lost)"
    )]
    OtherLayout { path: PathBuf, found: u32 },
    #[error(
        "--pin-dir {path} holds maps for {found} (this start asks for {asked}); pinned maps \
         cannot be resized. Start with the same settings, or end them first (`flowexport agent \
         --pin-dir {path} --detach` exports every flow and removes the pins), then start with \
         the new ones"
    )]
    OtherSizes {
        path: PathBuf,
        found: String,
        asked: String,
    },
}

/// The sizes a pinned state was made with (`CONTROL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub slots: u32,
    pub cache_slots: u32,
    pub ring_bytes: u32,
}

impl Layout {
    fn describe(&self) -> String {
        format!(
            "{} table slots, --cache-slots {}, --fallback-ring-bytes {}",
            self.slots, self.cache_slots, self.ring_bytes
        )
    }
}

/// A locked pin directory.
pub struct PinDir {
    path: PathBuf,
    _lock: File,
}

/// The type of the filesystem `path` is on (`statfs`'s `f_type`).
fn fs_type(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statfs is valid; statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl PinDir {
    /// Creates (if needed) and locks `path`, which must be on a BPF
    /// filesystem.
    pub fn open(path: &Path) -> Result<PinDir, PinError> {
        // Where the directory would be created must be a BPF filesystem
        // already: else creating it fails with a puzzling error (ENOENT on
        // sysfs, where /sys/fs/bpf is only a mount point) or leaves a stray
        // directory behind.
        let existing = path
            .ancestors()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if fs_type(existing).map_err(io_err(path))? != BPF_FS_MAGIC {
            return Err(PinError::NotBpfFs(path.to_path_buf()));
        }
        std::fs::create_dir_all(path).map_err(io_err(path))?;
        let dir = File::open(path).map_err(io_err(path))?;
        // SAFETY: an all-zero statfs is valid; fstatfs fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a statfs to fill.
        if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } != 0 {
            return Err(io_err(path)(io::Error::last_os_error()));
        }
        if st.f_type as i64 != BPF_FS_MAGIC {
            return Err(PinError::NotBpfFs(path.to_path_buf()));
        }
        // SAFETY: flock on our own fd.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = read_control(&path.join(MAP_CONTROL))
                    .ok()
                    .map(|c| c[CONTROL_OWNER_PID as usize])
                    .filter(|&p| p != 0);
                return Err(PinError::Busy {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            return Err(io_err(path)(e));
        }
        Ok(PinDir {
            path: path.to_path_buf(),
            _lock: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where the link of `hook` (`xdp`, `tc-ingress`, `tc-egress`) on
    /// `iface` is pinned. `:` cannot be part of an interface name.
    pub fn link(&self, hook: &str, iface: &str) -> PathBuf {
        self.path.join(format!("link:{hook}:{iface}"))
    }

    /// The pinned links: (hook, interface, path).
    pub fn links(&self) -> Vec<(String, String, PathBuf)> {
        let Ok(dir) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut v: Vec<_> = dir
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let rest = name.strip_prefix("link:")?;
                let (hook, iface) = rest.split_once(':')?;
                Some((hook.to_string(), iface.to_string(), e.path()))
            })
            .collect();
        v.sort();
        v
    }

    /// The layout of the maps pinned here, if any.
    pub fn layout(&self) -> Result<Option<Layout>, PinError> {
        let path = self.map(MAP_CONTROL);
        if !path.exists() {
            return Ok(None);
        }
        let c = read_control(&path).map_err(io_err(&path))?;
        Ok(Some(Layout {
            version: c[CONTROL_LAYOUT as usize],
            slots: c[CONTROL_SLOTS as usize],
            cache_slots: c[CONTROL_CACHE_SLOTS as usize],
            ring_bytes: c[CONTROL_RING_BYTES as usize],
        }))
    }

    /// Whether the pinned maps, of layout `found` (what [`PinDir::layout`]
    /// read), can be adopted by an agent that asks for `asked`: Ok(true)
    /// adopt, Ok(false) nothing pinned, Err refuse.
    pub fn check(&self, found: Option<Layout>, asked: &Layout) -> Result<bool, PinError> {
        match found {
            None => Ok(false),
            Some(l) if l.version != asked.version => Err(PinError::OtherLayout {
                path: self.path.clone(),
                found: l.version,
            }),
            Some(l) if l != *asked => Err(PinError::OtherSizes {
                path: self.path.clone(),
                found: l.describe(),
                asked: asked.describe(),
            }),
            Some(_) => Ok(true),
        }
    }

    /// Removes every pin (maps and links) and the directory: the programs
    /// are detached once their links' last reference goes, the maps freed
    /// once no program or process holds them.
    pub fn clear(&self) {
        for name in MAPS {
            let _ = std::fs::remove_file(self.map(name));
        }
        for (_, _, path) in self.links() {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The `CONTROL` values of a pinned map.
fn read_control(path: &Path) -> io::Result<Vec<u32>> {
    let data = MapData::from_pin(path).map_err(io::Error::other)?;
    let a: Array<MapData, u32> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(io::Error::other)?;
    (0..a.len())
        .map(|i| a.get(&i, 0).map_err(io::Error::other))
        .collect()
}

#[cfg(test)]
mod tests {
    /// The package's preinst compares the installed version's layout with its
    /// own NEW_LAYOUT to decide whether an upgrade must detach the pinned
    /// state first: it must be this build's layout.
    #[test]
    fn package_preinst_knows_this_layout() {
        let preinst = include_str!("../../../deploy/debian/preinst");
        let line = preinst
            .lines()
            .find_map(|l| l.strip_prefix("NEW_LAYOUT="))
            .expect("deploy/debian/preinst sets NEW_LAYOUT=");
        assert_eq!(
            line.trim().parse::<u32>().unwrap(),
            flowexport_common::LAYOUT_VERSION,
            "update NEW_LAYOUT in deploy/debian/preinst"
        );
    }

    /// A directory that is not on a BPF filesystem (here, the temporary
    /// directory's) is refused with the way out, before anything is created.
    #[test]
    fn a_directory_off_bpffs_is_refused_before_it_is_created() {
        let dir = std::env::temp_dir().join(format!("fe-pins-{}", std::process::id()));
        let e = super::PinDir::open(&dir.join("pins")).err().unwrap();
        assert!(matches!(e, super::PinError::NotBpfFs(_)), "{e}");
        assert!(e.to_string().contains("--pin-dir none"), "{e}");
        assert!(!dir.exists());
    }
}
