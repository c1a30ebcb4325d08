//! The self-checking record format shared by the tiers that keep bytes
//! outside process memory (mmap, disk, Redis).
//!
//! A record is one object (or a tombstone) as it lies in a file, a mapped
//! region or a Redis value:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "SCR1"
//! 4       1     kind: 1 object, 2 tombstone, 3 free extent (mmap tier)
//! 5       3     reserved, zero
//! 8       4     key length K (u32, little-endian, as every integer here)
//! 12      4     metadata length M (u32)
//! 16      8     payload length P (u64)
//! 24      8     sequence number (u64): a later write of a key has a larger one
//! 32      8     head checksum: XXH3-64 of bytes 0..32, the key and the metadata
//! 40      K     the key's canonical encoding (ArtifactKey::encode)
//! 40+K    M     the metadata (encode_meta)
//! 40+K+M  P     the payload; its XXH3-64 is the metadata's `checksum`
//! ```
//!
//! Two checksums, because the two halves are read at different times: a
//! recovery scan or an index rebuild checks the head (key and metadata)
//! without reading the payload, and every `get` checks the payload before
//! returning it. A record torn by a crash fails one of the two, so it is
//! discarded whole, never half-read.

use crate::Meta;
use crate::tier::checksum;

/// Bytes before the key.
pub const HEADER_LEN: usize = 40;

const MAGIC: [u8; 4] = *b"SCR1";

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An object: key, metadata, payload.
    Object = 1,
    /// A deletion of the key (no metadata, no payload).
    Tombstone = 2,
    /// Free space of `payload_len` bytes after the header (no key, no
    /// metadata); used where records are laid in a fixed region.
    Free = 3,
}

/// The fixed-size head of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the record holds.
    pub kind: Kind,
    /// Key bytes.
    pub key_len: u32,
    /// Metadata bytes.
    pub meta_len: u32,
    /// Payload bytes.
    pub payload_len: u64,
    /// Write order: larger is newer.
    pub seq: u64,
    /// XXH3-64 of the first 32 header bytes, the key and the metadata.
    pub head_sum: u64,
}

impl Header {
    /// The header of a record holding `key`, `meta` (encoded) and a payload
    /// of `payload_len` bytes, with its head checksum.
    pub fn new(kind: Kind, key: &[u8], meta: &[u8], payload_len: u64, seq: u64) -> Header {
        let mut h = Header {
            kind,
            key_len: key.len() as u32,
            meta_len: meta.len() as u32,
            payload_len,
            seq,
            head_sum: 0,
        };
        h.head_sum = h.sum_of(key, meta);
        h
    }

    fn sum_of(&self, key: &[u8], meta: &[u8]) -> u64 {
        let bytes = self.to_bytes();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&bytes[..32]);
        hasher.update(key);
        hasher.update(meta);
        hasher.digest()
    }

    /// The 40 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[8..12].copy_from_slice(&self.key_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.meta_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.head_sum.to_le_bytes());
        b
    }

    /// Parses a header; `None` when `b` is short, the magic is wrong or the
    /// kind is unknown (not a record: free space, garbage, a torn write).
    pub fn parse(b: &[u8]) -> Option<Header> {
        let b = b.get(..HEADER_LEN)?;
        if b[0..4] != MAGIC || b[5..8] != [0, 0, 0] {
            return None;
        }
        let kind = match b[4] {
            1 => Kind::Object,
            2 => Kind::Tombstone,
            3 => Kind::Free,
            _ => return None,
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Some(Header {
            kind,
            key_len: u32_at(8),
            meta_len: u32_at(12),
            payload_len: u64_at(16),
            seq: u64_at(24),
            head_sum: u64_at(32),
        })
    }

    /// Whether `key` and `meta` are the ones this header was written with.
    pub fn check(&self, key: &[u8], meta: &[u8]) -> bool {
        key.len() == self.key_len as usize
            && meta.len() == self.meta_len as usize
            && self.sum_of(key, meta) == self.head_sum
    }

    /// Bytes from the start of the header to the start of the payload.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.key_len) + u64::from(self.meta_len)
    }

    /// Bytes of the whole record.
    pub fn total_len(&self) -> u64 {
        self.payload_offset() + self.payload_len
    }
}

/// A whole record in one buffer (for stores that write a record in one
/// call, such as Redis).
pub fn encode(kind: Kind, key: &[u8], meta: &Meta, payload: &[u8], seq: u64) -> Vec<u8> {
    let meta = encode_meta(meta);
    let header = Header::new(kind, key, &meta, payload.len() as u64, seq);
    let mut out = Vec::with_capacity(HEADER_LEN + key.len() + meta.len() + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&meta);
    out.extend_from_slice(payload);
    out
}

/// A record read back from one buffer, every check passed.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// The header.
    pub header: Header,
    /// The key's encoding.
    pub key: &'a [u8],
    /// The metadata.
    pub meta: Meta,
    /// The payload (its checksum verified for objects).
    pub payload: &'a [u8],
}

/// Decodes a record written by [`encode`]; the error says which check
/// failed, for [`crate::Error::Corrupt`].
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, String> {
    let header = Header::parse(buf).ok_or("no record header (bad magic or kind)")?;
    let total = header.total_len();
    if total != buf.len() as u64 {
        return Err(format!(
            "record is {} bytes, its header says {total}",
            buf.len()
        ));
    }
    let k_end = HEADER_LEN + header.key_len as usize;
    let m_end = k_end + header.meta_len as usize;
    let (key, meta_bytes) = (&buf[HEADER_LEN..k_end], &buf[k_end..m_end]);
    if !header.check(key, meta_bytes) {
        return Err("head checksum mismatch (key or metadata damaged)".into());
    }
    let meta = if header.kind == Kind::Object {
        decode_meta(meta_bytes).ok_or("metadata does not decode")?
    } else {
        Meta::default()
    };
    let payload = &buf[m_end..];
    if header.kind == Kind::Object {
        check_payload(&meta, payload)?;
    }
    Ok(Decoded {
        header,
        key,
        meta,
        payload,
    })
}

/// Checks a payload against its metadata's length and checksum.
pub fn check_payload(meta: &Meta, payload: &[u8]) -> Result<(), String> {
    if payload.len() as u64 != meta.length {
        return Err(format!(
            "payload is {} bytes, metadata says {}",
            payload.len(),
            meta.length
        ));
    }
    let sum = checksum(payload);
    if sum != meta.checksum {
        return Err(format!(
            "payload checksum {sum:016x} does not match the stored {:016x}",
            meta.checksum
        ));
    }
    Ok(())
}

/// The binary encoding of [`Meta`]: dtype, shape (u32 count, then u64s),
/// codec, length, created_ns, checksum; strings as u16 length + UTF-8;
/// integers little-endian.
pub fn encode_meta(meta: &Meta) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(32 + meta.dtype.len() + meta.codec.len() + 8 * meta.shape.len());
    let string = |out: &mut Vec<u8>, s: &str| {
        // Longer strings are cut at a character boundary: metadata
        // strings are short names (`bf16`, `zstd`), never data.
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&(end as u16).to_le_bytes());
        out.extend_from_slice(&s.as_bytes()[..end]);
    };
    string(&mut out, &meta.dtype);
    out.extend_from_slice(&(meta.shape.len() as u32).to_le_bytes());
    for d in &meta.shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    string(&mut out, &meta.codec);
    out.extend_from_slice(&meta.length.to_le_bytes());
    out.extend_from_slice(&meta.created_ns.to_le_bytes());
    out.extend_from_slice(&meta.checksum.to_le_bytes());
    out
}

/// Decodes [`encode_meta`]'s output; `None` when it is not one.
pub fn decode_meta(b: &[u8]) -> Option<Meta> {
    let mut c = Cursor::new(b, 0);
    let dtype = c.string()?;
    let n = u32::from_le_bytes(c.array()?) as usize;
    // A crafted count must not allocate: each dimension needs 8 bytes.
    if n > b.len() / 8 {
        return None;
    }
    let mut shape = Vec::with_capacity(n);
    for _ in 0..n {
        shape.push(u64::from_le_bytes(c.array()?));
    }
    let codec = c.string()?;
    let length = u64::from_le_bytes(c.array()?);
    let created_ns = u64::from_le_bytes(c.array()?);
    let checksum = u64::from_le_bytes(c.array()?);
    if c.position() != b.len() {
        return None;
    }
    Some(Meta {
        dtype,
        shape,
        codec,
        length,
        created_ns,
        checksum,
    })
}

/// Reads little-endian fields off a byte slice; every read is `None`
/// past the end, so crafted lengths cannot overrun.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at byte `at` of `b`.
    pub(crate) fn new(b: &'a [u8], at: usize) -> Cursor<'a> {
        Cursor { b, at }
    }

    /// Where the next read starts.
    pub(crate) fn position(&self) -> usize {
        self.at
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = u16::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_catch_damage() {
        let meta = Meta {
            dtype: "bf16".into(),
            shape: vec![4, 8],
            codec: String::new(),
            length: 5,
            created_ns: 7,
            checksum: checksum(b"hello"),
        };
        let rec = encode(Kind::Object, b"key", &meta, b"hello", 3);
        let d = decode(&rec).unwrap();
        assert_eq!(
            (d.key, d.payload, d.header.seq),
            (&b"key"[..], &b"hello"[..], 3)
        );
        assert_eq!(d.meta, meta);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            assert!(
                decode(&bad).is_err(),
                "a flipped bit at byte {i} went unnoticed"
            );
        }
        assert!(decode(&rec[..rec.len() - 1]).is_err());
    }
}
