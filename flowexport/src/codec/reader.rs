//! A big-endian cursor over one datagram, shared by the NetFlow/IPFIX and
//! sFlow decoders: every read names what it was reading, for the error
//! when the bytes run out.

/// The bytes ran out while reading this (each decoder's error type has a
/// `Truncated` variant made from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Truncated(pub(crate) &'static str);

#[derive(Clone, Copy)]
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Reader { b, off: 0 }
    }

    /// Bytes not read yet.
    pub(crate) fn left(&self) -> usize {
        self.b.len() - self.off
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Truncated> {
        if self.left() < n {
            return Err(Truncated(what));
        }
        let s = &self.b[self.off..self.off + n];
        self.off += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, Truncated> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, Truncated> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, Truncated> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_and_names_what_ran_out() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 3, 9]);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.left(), 1);
        assert_eq!(r.u16("d"), Err(Truncated("d")));
        // A failed read takes nothing.
        assert_eq!(r.take(1, "e"), Ok(&[9][..]));
        assert_eq!(r.left(), 0);
    }
}
