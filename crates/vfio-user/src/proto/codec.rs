//! The little-endian byte cursors every message family is read and written with: [`Reader`]
//! (bounds-checked, never panics) for request payloads and [`Writer`] for reply payloads.

/// Little-endian cursor over a payload; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `b`.
    #[inline]
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }
    /// The next `n` bytes.
    #[inline]
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    /// A u16.
    #[inline]
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_le_bytes)
    }
    /// A u32.
    #[inline]
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    }
    /// A u64.
    #[inline]
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    }
    /// Bytes not read yet.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        self.b.get(self.pos..).unwrap_or(&[])
    }
}

/// A little-endian payload builder for replies.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Append `n` zero bytes and return them, for data produced in place (a region read).
    pub fn zeroed(&mut self, n: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        self.buf.get_mut(start..).unwrap_or(&mut [])
    }
    /// A writer appending to `buf` after clearing it: reuses its allocation.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Writer { buf }
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}
