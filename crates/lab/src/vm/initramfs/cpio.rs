//! The newc cpio writer.

use super::*;

/// File type bits of `st_mode`.
pub(super) const S_IFDIR: u32 = 0o040000;
pub(super) const S_IFREG: u32 = 0o100000;
pub(super) const S_IFLNK: u32 = 0o120000;
pub(super) const S_IFCHR: u32 = 0o020000;

/// The newc magic.
pub(super) const NEWC_MAGIC: &[u8; 6] = b"070701";
/// The name of the last member.
pub(super) const TRAILER: &str = "TRAILER!!!";

/// Writes a newc ("SVR4 no CRC") cpio archive, the format the kernel unpacks into its rootfs.
///
/// Paths are relative (`bin/busybox`); parent directories are added automatically (mode 0755)
/// the first time a path below them is added, because the kernel does not create missing parents.
/// Owners are root, timestamps are 0, so the archive is reproducible.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    paths: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// A writer emitting to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            paths: HashSet::new(),
        }
    }

    /// Adds a directory (and its missing parents).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = Self::clean(path)?;
        if self.paths.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.entry(&path, S_IFDIR | (perm & 0o7777), 2, 0, &[])
    }

    /// Adds a regular file.
    pub fn add_file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, 0, data)
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let path = self.new_path(path)?;
        let rdev = (u64::from(major) << 32) | u64::from(minor);
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, rdev, &[])
    }

    /// Whether `path` was added (explicitly or as a parent).
    pub fn contains(&self, path: &str) -> bool {
        Self::clean(path).is_ok_and(|p| self.paths.contains(&p))
    }

    /// Writes the trailer, pads the archive to a 512-byte multiple and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, 0, &[])?;
        let pad = (512 - (self.written % 512)) % 512;
        self.write(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn clean(path: &str) -> io::Result<String> {
        let p = path.trim_start_matches('/').trim_end_matches('/');
        let ok = !p.is_empty()
            && p != TRAILER
            && !p.contains('\0')
            && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(p.to_string())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid archive path {path:?}"),
            ))
        }
    }

    fn new_path(&mut self, path: &str) -> io::Result<String> {
        let path = Self::clean(path)?;
        if self.paths.contains(&path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("duplicate archive path {path:?}"),
            ));
        }
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if !self.paths.contains(&prefix) {
                let dir = prefix.clone();
                self.entry(&dir, S_IFDIR | 0o755, 2, 0, &[])?;
            }
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.write(&[0u8; 3][..pad as usize])
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} is too large"),
            )
        })?;
        let ino = if path == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = path.len() as u32 + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            (rdev >> 32) as u32,
            rdev as u32,
            namesize,
            0, // check
        ];
        let mut header = Vec::with_capacity(110 + path.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(path.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()?;
        if path != TRAILER {
            self.paths.insert(path.to_string());
        }
        Ok(())
    }
}
