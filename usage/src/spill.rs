//! The spill log: an append-only file every usage batch is written to before the
//! store is offered it, so that a store outage, a crash or a restart loses nothing
//! that reached the file.
//!
//! Layout: a sequence of frames, each `[length: u32 LE][crc32 of payload: u32 LE]
//! [payload]`, the payload being one batch of [`UsageRecord`]s in postcard. A side
//! file (`<log>.shipped`) holds the offset up to which frames are known to be in the
//! store; it is written after each shipment without fsync, so after a crash a few
//! batches may be shipped again, which the stores deduplicate by `event_id`.
//!
//! When everything is shipped the log is truncated to zero; when the shipped prefix
//! grows large while new batches keep arriving, the unshipped tail is copied to a
//! new file that replaces the log. A log that is damaged (a torn last write, a bad
//! checksum) is read up to the damage; the damaged bytes are moved aside to
//! `<log>.damaged-<unix ms>` and reported, never a reason to stop.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agora_config::usage::UsageRecord;

const HEADER: usize = 8;
/// No batch comes near this; a length above it is damage.
const MAX_FRAME: usize = 256 * 1024 * 1024;
/// Above this many shipped bytes, the unshipped tail is moved to a fresh file.
const COMPACT_AFTER: u64 = 64 * 1024 * 1024;

/// What opening the log found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Batches waiting to be shipped.
    pub pending_batches: usize,
    pub pending_bytes: u64,
    /// Bytes past the last good frame, moved aside.
    pub damaged_bytes: u64,
    pub damaged_copy: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the spill log is full ({len} of {max} bytes)")]
    Full { len: u64, max: u64 },
    #[error("spill log: {0}")]
    Io(#[from] io::Error),
}

pub struct SpillLog {
    path: PathBuf,
    file: File,
    /// Length of the valid frames.
    len: u64,
    /// Everything before this offset is in the store.
    shipped: u64,
    /// The logical offset of the file's first byte: it grows by what truncation
    /// and compaction remove, so logical offsets handed out earlier stay valid.
    base: u64,
    max_bytes: u64,
    fsync_every: Option<Duration>,
    last_sync: Instant,
    unsynced: bool,
    /// At shutdown the last batches are taken past the bound rather than lost.
    overflow: bool,
}

/// Encodes a batch as one frame.
pub fn encode(batch: &[UsageRecord]) -> postcard::Result<Vec<u8>> {
    let mut frame = postcard::to_extend(batch, vec![0u8; HEADER])?;
    let len = (frame.len() - HEADER) as u32;
    let crc = crc32fast::hash(&frame[HEADER..]);
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

/// Decodes one whole frame.
pub fn decode(frame: &[u8]) -> Option<Vec<UsageRecord>> {
    decode_one(frame, 0).map(|(batch, _)| batch)
}

fn decode_one(bytes: &[u8], at: usize) -> Option<(Vec<UsageRecord>, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let batch = postcard::from_bytes(payload).ok()?;
    Some((batch, at + HEADER + len))
}

/// The ends of the frames at the start of `bytes` whose checksums hold, and where
/// the good part ends (payloads are not decoded).
fn scan(bytes: &[u8]) -> (Vec<usize>, usize) {
    let mut ends = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME {
            break;
        }
        match bytes.get(at + HEADER..at + HEADER + len) {
            Some(payload) if crc32fast::hash(payload) == crc => {
                at += HEADER + len;
                ends.push(at);
            }
            _ => break,
        }
    }
    (ends, at)
}

fn shipped_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".shipped");
    PathBuf::from(name)
}

impl SpillLog {
    /// Opens (or creates) the log, recovering what it holds.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        fsync_every: Option<Duration>,
    ) -> io::Result<(SpillLog, Recovery)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (ends, good) = scan(&bytes);
        let mut recovery = Recovery::default();
        if good < bytes.len() {
            let copy = PathBuf::from(format!(
                "{}.damaged-{}",
                path.display(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ));
            std::fs::write(&copy, &bytes[good..])?;
            file.set_len(good as u64)?;
            file.sync_all()?;
            recovery.damaged_bytes = (bytes.len() - good) as u64;
            recovery.damaged_copy = Some(copy);
        }
        let saved = std::fs::read_to_string(shipped_path(path))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        // Trust the saved offset only if it falls on a frame boundary.
        let shipped = if ends.iter().any(|end| *end as u64 == saved) {
            saved
        } else {
            0
        };
        recovery.pending_batches = ends.iter().filter(|end| **end as u64 > shipped).count();
        recovery.pending_bytes = good as u64 - shipped;
        let log = SpillLog {
            path: path.to_owned(),
            file,
            len: good as u64,
            shipped,
            base: 0,
            max_bytes,
            fsync_every,
            last_sync: Instant::now(),
            unsynced: false,
            overflow: false,
        };
        // A stale offset must not survive to match a later frame by chance.
        log.save_shipped()?;
        Ok((log, recovery))
    }

    /// Appends one encoded frame (see [`encode`]), syncing per the fsync policy.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), AppendError> {
        if self.len + frame.len() as u64 > self.max_bytes {
            if self.shipped > 0 {
                self.compact()?;
            }
            if self.len + frame.len() as u64 > self.max_bytes && !self.overflow {
                return Err(AppendError::Full {
                    len: self.len,
                    max: self.max_bytes,
                });
            }
        }
        if let Err(e) = self.file.write_all(frame) {
            // Cut a partial write off so the next frame starts on a boundary.
            let _ = self.file.set_len(self.len);
            return Err(e.into());
        }
        self.len += frame.len() as u64;
        self.unsynced = true;
        match self.fsync_every {
            None => self.sync()?,
            Some(every) if self.last_sync.elapsed() >= every => self.sync()?,
            Some(_) => {}
        }
        Ok(())
    }

    /// Lets appends pass the bound from now on (shutdown's last batches).
    pub fn allow_overflow(&mut self) {
        self.overflow = true;
    }

    /// Flushes appended frames to the disk.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Bytes not yet in the store.
    pub fn pending_bytes(&self) -> u64 {
        self.len - self.shipped
    }

    /// Bytes in the log, shipped or not.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where shipping resumes.
    #[cfg(test)]
    pub fn shipped(&self) -> u64 {
        self.shipped
    }

    /// The frames not yet shipped, to read without holding the log: frames that
    /// are written never change, and compaction replaces the file rather than
    /// rewriting it, so the handle keeps seeing them.
    pub fn pending(&self) -> io::Result<Pending> {
        Ok(Pending {
            reader: self.file.try_clone()?,
            base: self.base,
            from: self.base + self.shipped,
            to: self.base + self.len,
        })
    }

    /// Reads whole frames from physical `offset`, up to about `max_bytes` (always
    /// at least one frame if there is one).
    fn read_frames(
        reader: &File,
        offset: u64,
        len: u64,
        max_bytes: usize,
    ) -> io::Result<Vec<(u64, Vec<UsageRecord>)>> {
        let mut out = Vec::new();
        let mut at = offset;
        let mut taken = 0usize;
        while at < len && (taken < max_bytes || out.is_empty()) {
            let mut header = [0u8; HEADER];
            reader.read_exact_at(&mut header, at)?;
            let size = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            if size > MAX_FRAME || at + (HEADER + size) as u64 > len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "damaged spill frame",
                ));
            }
            let mut frame = vec![0u8; HEADER + size];
            reader.read_exact_at(&mut frame, at)?;
            let Some((batch, end)) = decode_one(&frame, 0) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "damaged spill frame",
                ));
            };
            at += end as u64;
            taken += end;
            out.push((at, batch));
        }
        Ok(out)
    }

    /// Records that everything before the logical offset `end` (from
    /// [`Pending::read`]) is in the store.
    pub fn mark_shipped(&mut self, end: u64) -> io::Result<()> {
        let physical = end.saturating_sub(self.base).min(self.len);
        self.shipped = self.shipped.max(physical);
        if self.shipped == self.len {
            self.sync()?;
            // The side file first: a crash between the two replays (deduplicated)
            // rather than skips.
            let all = self.len;
            self.shipped = 0;
            self.save_shipped()?;
            self.file.set_len(0)?;
            self.base += all;
            self.len = 0;
            return Ok(());
        } else if self.shipped >= COMPACT_AFTER {
            self.compact()?;
        }
        self.save_shipped()
    }

    fn save_shipped(&self) -> io::Result<()> {
        let target = shipped_path(&self.path);
        let tmp = target.with_extension("shipped.tmp");
        std::fs::write(&tmp, self.shipped.to_string())?;
        std::fs::rename(tmp, target)
    }

    /// Moves the unshipped tail to a fresh file that replaces the log.
    fn compact(&mut self) -> io::Result<()> {
        let tail_len = self.len - self.shipped;
        let tmp = self.path.with_extension("compact.tmp");
        // Copied in pieces, into a file whose handle is opened before the rename,
        // so the log never points at an unlinked file.
        let copied = (|| -> io::Result<File> {
            let mut out = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .truncate(false)
                .open(&tmp)?;
            out.set_len(0)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = self.shipped;
            while at < self.len {
                let n = ((self.len - at) as usize).min(buf.len());
                self.file.read_exact_at(&mut buf[..n], at)?;
                out.write_all(&buf[..n])?;
                at += n as u64;
            }
            out.sync_all()?;
            Ok(out)
        })();
        let out = match copied {
            Ok(out) => out,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // The saved offset must never point into the new file at the old position.
        let removed = self.shipped;
        self.shipped = 0;
        self.save_shipped()?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = out;
        self.base += removed;
        self.len = tail_len;
        self.unsynced = false;
        Ok(())
    }
}

/// Unshipped frames as of one moment (see [`SpillLog::pending`]).
pub struct Pending {
    reader: File,
    base: u64,
    /// Logical range of the frames.
    pub from: u64,
    pub to: u64,
}

impl Pending {
    /// Whole frames from the start, about `max_bytes` of them (at least one),
    /// each with the logical offset just past it.
    pub fn read(&self, max_bytes: usize) -> io::Result<Vec<(u64, Vec<UsageRecord>)>> {
        let frames = SpillLog::read_frames(
            &self.reader,
            self.from - self.base,
            self.to - self.base,
            max_bytes,
        )?;
        Ok(frames
            .into_iter()
            .map(|(end, batch)| (end + self.base, batch))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::event;
    use uuid::Uuid;

    fn batch(n: usize) -> Vec<UsageRecord> {
        (0..n)
            .map(|i| UsageRecord::Event(Box::new(event(Uuid::from_u128(1), i as i64, 5, None))))
            .collect()
    }

    #[test]
    fn frames_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        let (mut log, rec) = SpillLog::open(&path, 1 << 30, None).unwrap();
        assert_eq!(rec, Recovery::default());
        let (a, b) = (batch(3), batch(5));
        log.append(&encode(&a).unwrap()).unwrap();
        log.append(&encode(&b).unwrap()).unwrap();
        let frames = log.pending().unwrap().read(1).unwrap();
        assert_eq!(frames.len(), 1, "max_bytes stops after the first frame");
        assert_eq!(frames[0].1, a);
        log.mark_shipped(frames[0].0).unwrap();
        drop(log);

        let (log, rec) = SpillLog::open(&path, 1 << 30, None).unwrap();
        assert_eq!(rec.pending_batches, 1, "the shipped offset was kept");
        let frames = log.pending().unwrap().read(1 << 20).unwrap();
        assert_eq!(frames.into_iter().map(|f| f.1).collect::<Vec<_>>(), vec![b]);
    }

    #[test]
    fn everything_shipped_truncates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        let (mut log, _) = SpillLog::open(&path, 1 << 30, None).unwrap();
        log.append(&encode(&batch(10)).unwrap()).unwrap();
        let end = log.len();
        log.mark_shipped(end).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(log.pending_bytes(), 0);
    }

    #[test]
    fn a_full_log_refuses_and_compaction_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        let frame = encode(&batch(20)).unwrap();
        let max = frame.len() as u64 * 3;
        let (mut log, _) = SpillLog::open(&path, max, None).unwrap();
        for _ in 0..3 {
            log.append(&frame).unwrap();
        }
        assert!(matches!(log.append(&frame), Err(AppendError::Full { .. })));
        // Ship one frame without emptying the log: the next append compacts.
        log.mark_shipped(frame.len() as u64).unwrap();
        log.append(&frame).unwrap();
        assert_eq!(log.len(), frame.len() as u64 * 3);
        assert_eq!(log.shipped(), 0);
        let frames = log.pending().unwrap().read(1 << 30).unwrap();
        assert_eq!(frames.len(), 3);
    }

    #[test]
    fn a_torn_or_corrupt_log_is_recovered_up_to_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        let (a, b, c) = (batch(2), batch(3), batch(4));
        let mut bytes = encode(&a).unwrap();
        bytes.extend(encode(&b).unwrap());
        let good = bytes.len();
        let mut third = encode(&c).unwrap();
        // Flip a payload byte: the checksum no longer matches.
        let last = third.len() - 1;
        third[last] ^= 0xff;
        bytes.extend(&third);
        std::fs::write(&path, &bytes).unwrap();
        let (mut log, rec) = SpillLog::open(&path, 1 << 30, None).unwrap();
        assert_eq!(rec.pending_batches, 2);
        assert_eq!(rec.damaged_bytes, third.len() as u64);
        let copy = rec.damaged_copy.unwrap();
        assert_eq!(std::fs::read(copy).unwrap(), third);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good as u64);
        // Appending goes on from the last good frame.
        log.append(&encode(&c).unwrap()).unwrap();
        let frames = log.pending().unwrap().read(1 << 30).unwrap();
        assert_eq!(
            frames.into_iter().map(|f| f.1).collect::<Vec<_>>(),
            vec![a, b, c.clone()]
        );

        // A write torn in the middle of a header, and garbage lengths.
        for tail in [
            vec![1u8, 0, 0],
            vec![0xff; 8],
            encode(&c).unwrap()[..20].to_vec(),
        ] {
            let mut bytes = encode(&c).unwrap();
            bytes.extend(&tail);
            std::fs::write(&path, &bytes).unwrap();
            std::fs::remove_file(shipped_path(&path)).ok();
            let (_, rec) = SpillLog::open(&path, 1 << 30, None).unwrap();
            assert_eq!(rec.pending_batches, 1);
            assert_eq!(rec.damaged_bytes, tail.len() as u64);
        }
    }

    #[test]
    fn offsets_read_before_a_compaction_stay_right_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        let (a, b, c, d) = (batch(4), batch(5), batch(6), batch(4));
        let frame_a = encode(&a).unwrap();
        let (mut log, _) = SpillLog::open(&path, frame_a.len() as u64 * 4, None).unwrap();
        log.append(&frame_a).unwrap();
        log.append(&encode(&b).unwrap()).unwrap();
        log.append(&encode(&c).unwrap()).unwrap();
        // The shipper ships `a`, then reads `b` and `c`...
        let first = log.pending().unwrap().read(1).unwrap();
        log.mark_shipped(first[0].0).unwrap();
        let rest = log.pending().unwrap().read(1 << 20).unwrap();
        assert_eq!(
            rest.iter().map(|f| f.1.clone()).collect::<Vec<_>>(),
            vec![b, c]
        );
        // ...while an append that does not fit compacts the file under it.
        log.append(&encode(&d).unwrap()).unwrap();
        assert_eq!(log.shipped(), 0, "compacted");
        // Its offsets still mean the same frames: only `d` is left.
        log.mark_shipped(rest.last().unwrap().0).unwrap();
        let left = log.pending().unwrap().read(1 << 20).unwrap();
        assert_eq!(left.into_iter().map(|f| f.1).collect::<Vec<_>>(), vec![d]);
        let end = log.pending().unwrap().to;
        log.mark_shipped(end).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_saved_offset_off_a_frame_boundary_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.log");
        std::fs::write(&path, encode(&batch(2)).unwrap()).unwrap();
        std::fs::write(shipped_path(&path), "3").unwrap();
        let (log, rec) = SpillLog::open(&path, 1 << 30, None).unwrap();
        assert_eq!(log.shipped(), 0);
        assert_eq!(rec.pending_batches, 1);
    }
}
