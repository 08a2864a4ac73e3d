//! HPACK (RFC 7541) decoding of the header blocks a client sends on the KMS socket, for
//! the `:authority` layer ([`super::authority`]).
//!
//! Why not a crate's decoder: `loona-hpack` (which this is checked against, in the tests
//! and by differential fuzzing) rebuilds a hash map of the 257 Huffman codes for every
//! Huffman-coded string and walks it bit by bit: about 7 µs per request from grpc-go,
//! which Huffman-codes its `grpc-timeout`. Huffman decoding itself comes from
//! `httlib-huffman` (table driven); this file is the field representations, integers and
//! the tables, with every length checked and the dynamic table bounded.

use std::collections::VecDeque;

/// Why a header block cannot be decoded. Any of these ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("a field runs past the end of the header block")]
    Truncated,
    #[error("an integer longer than 2^28")]
    IntegerTooLarge,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("a Huffman-coded string that does not decode")]
    Huffman,
    #[error("a table size update to {0} bytes, more than the {1} allowed")]
    TableTooLarge(usize, usize),
    #[error("a table size update after the first field of a block")]
    LateSizeUpdate,
    #[error("a block that ends with a table size update")]
    SizeUpdateAtEnd,
}

/// RFC 7541 Appendix A.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The per-entry overhead of RFC 7541 §4.1.
const ENTRY_OVERHEAD: usize = 32;

/// A dynamic table entry: name and value end to end.
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The decoder of one connection: its dynamic table lives as long as the connection.
pub struct Decoder {
    /// Newest first (index 62).
    dynamic: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The most a size update may ask for: what the server advertised.
    allowed: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

/// What a field callback tells the decoder.
pub enum Flow {
    Continue,
    Stop,
}

impl Decoder {
    /// A decoder whose table may hold `allowed` bytes (SETTINGS_HEADER_TABLE_SIZE).
    pub fn new(allowed: usize) -> Self {
        Self {
            dynamic: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes one whole header block, calling `field(name, value)` for each field in
    /// order. [`Flow::Stop`] ends decoding early (the table then reflects only the fields
    /// decoded so far, so the connection must not be used further).
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]) -> Flow,
    ) -> Result<(), HpackError> {
        let mut fields = 0usize;
        let mut last_was_update = false;
        while let Some(&first) = block.first() {
            last_was_update = false;
            if first & 0x80 != 0 {
                let (index, rest) = integer(block, 7)?;
                block = rest;
                let (name, value) = self.get(index)?;
                fields += 1;
                if let Flow::Stop = field(name, value) {
                    return Ok(());
                }
                continue;
            }
            if first & 0xe0 == 0x20 {
                if fields > 0 {
                    return Err(HpackError::LateSizeUpdate);
                }
                let (size, rest) = integer(block, 5)?;
                block = rest;
                if size > self.allowed {
                    return Err(HpackError::TableTooLarge(size, self.allowed));
                }
                self.max_size = size;
                self.evict(0);
                last_was_update = true;
                continue;
            }
            // Literals: with incremental indexing (01), never indexed (0001), without (0000).
            let (indexing, prefix) = if first & 0x40 != 0 {
                (true, 6)
            } else {
                (false, 4)
            };
            let (index, rest) = integer(block, prefix)?;
            block = rest;
            let mut name = std::mem::take(&mut self.name);
            name.clear();
            if index == 0 {
                block = string(block, &mut name)?;
            } else {
                name.extend_from_slice(self.get(index)?.0);
            }
            let mut value = std::mem::take(&mut self.value);
            value.clear();
            let parsed = string(block, &mut value);
            let flow = match parsed {
                Ok(rest) => {
                    block = rest;
                    fields += 1;
                    let flow = field(&name, &value);
                    if indexing {
                        self.insert(&name, &value);
                    }
                    Some(flow)
                }
                Err(_) => None,
            };
            self.name = name;
            self.value = value;
            match (parsed, flow) {
                (Err(e), _) => return Err(e),
                (_, Some(Flow::Stop)) => return Ok(()),
                _ => {}
            }
        }
        if last_was_update {
            return Err(HpackError::SizeUpdateAtEnd);
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .dynamic
                .get(index - 62)
                .map(|e| e.bytes.split_at(e.name_len))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.dynamic.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        self.dynamic.push_front(Entry {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        });
        self.size += size;
    }

    /// Evicts the oldest entries until `incoming` more bytes fit.
    fn evict(&mut self, incoming: usize) {
        while self.size + incoming > self.max_size {
            match self.dynamic.pop_back() {
                Some(e) => self.size -= e.size(),
                None => break,
            }
        }
    }
}

/// RFC 7541 §5.1: an integer with an N-bit prefix; the value and what follows it.
fn integer(block: &[u8], prefix: u8) -> Result<(usize, &[u8]), HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok((value, rest));
    }
    let mut shift = 0u32;
    loop {
        let (&b, tail) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = tail;
        if shift > 21 {
            return Err(HpackError::IntegerTooLarge);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
}

/// RFC 7541 §5.2: a string literal, appended to `out`; what follows it.
fn string<'a>(block: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (len, rest) = integer(block, 7)?;
    if len > rest.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = rest.split_at(len);
    if huffman {
        let start = out.len();
        httlib_huffman::decode(raw, out, httlib_huffman::DecoderSpeed::FourBits)
            .map_err(|_| HpackError::Huffman)?;
        // A string has exactly one valid Huffman coding (its codes, then at most 7 bits of
        // the EOS code's leading 1s). httlib-huffman accepts some invalid paddings (zero
        // bits, found by the `hpack` fuzz target), so the input must be that coding.
        let mut again = Vec::with_capacity(raw.len());
        httlib_huffman::encode(&out[start..], &mut again).map_err(|_| HpackError::Huffman)?;
        if again != raw {
            return Err(HpackError::Huffman);
        }
    } else {
        out.extend_from_slice(raw);
    }
    Ok(rest)
}

/// RFC 7541 §5.1, for the re-encoder: `value` with an N-bit prefix after `high` bits.
pub fn encode_integer(value: usize, prefix: u8, high: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        // < 2^prefix <= 255: fits the byte.
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn ours(d: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut f = Vec::new();
        d.decode(block, |n, v| {
            f.push((n.to_vec(), v.to_vec()));
            Flow::Continue
        })?;
        Ok(f)
    }

    fn huffman(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        httlib_huffman::encode(s, &mut out).unwrap();
        out
    }

    /// A string literal, Huffman-coded or not.
    fn lit(s: &[u8], h: bool, out: &mut Vec<u8>) {
        let raw = if h { huffman(s) } else { s.to_vec() };
        encode_integer(raw.len(), 7, if h { 0x80 } else { 0 }, out);
        out.extend_from_slice(&raw);
    }

    #[test]
    fn the_static_table_matches_loona_hpack() {
        let mut reference = loona_hpack::Decoder::new();
        let mut d = Decoder::new(4096);
        for i in 1..=61u8 {
            let block = [0x80 | i];
            assert_eq!(
                ours(&mut d, &block).unwrap(),
                reference.decode(&block).unwrap()
            );
        }
    }

    #[test]
    fn integers_round_trip_and_overlong_ones_are_refused() {
        for prefix in 1..=8u8 {
            for v in [0, 1, 30, 31, 127, 128, 255, 1337, 65_535, 1 << 20] {
                let mut b = Vec::new();
                encode_integer(v, prefix, 0, &mut b);
                b.push(0xaa);
                assert_eq!(
                    integer(&b, prefix).unwrap(),
                    (v, &[0xaa][..]),
                    "{v}/{prefix}"
                );
            }
        }
        assert_eq!(
            integer(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f], 7),
            Err(HpackError::IntegerTooLarge)
        );
        assert_eq!(integer(&[0x7f, 0x80], 7), Err(HpackError::Truncated));
    }

    /// Blocks like the ones grpc-go and h2 send, in every representation, Huffman and
    /// not, with table references and evictions across blocks: decoded the same as
    /// loona-hpack decodes them.
    #[test]
    fn agrees_with_loona_hpack_across_blocks_and_evictions() {
        let mut reference = loona_hpack::Decoder::new();
        let mut d = Decoder::new(4096);
        let mut blocks = Vec::new();
        for i in 0..300usize {
            let h = i % 2 == 0;
            let mut b = Vec::new();
            if i == 40 {
                encode_integer(256, 5, 0x20, &mut b); // shrink the table: evictions
            }
            if i == 41 {
                encode_integer(4096, 5, 0x20, &mut b);
            }
            b.push(0x83); // :method POST
            b.push(0x40); // literal with indexing, new name
            lit(b"grpc-timeout", h, &mut b);
            lit(format!("{}m", 3000 - i).as_bytes(), h, &mut b);
            b.push(0x41); // :authority (static 1), with indexing
            lit(b"/var/run/kms.sock", !h, &mut b);
            b.push(0x04); // :path, without indexing
            lit(b"/v2.KeyManagementService/Encrypt", h, &mut b);
            b.push(0x10); // never indexed, new name
            lit(b"x-secret", h, &mut b);
            lit(&vec![b'v'; i * 7 % 900], h, &mut b);
            if i > 0 {
                b.push(0x80 | 62); // the newest dynamic entry
                encode_integer(62 + i % 3, 7, 0x80, &mut b);
            }
            b.push(0x40);
            lit(&vec![b'n'; i * 13 % 3000], false, &mut b); // some larger than the table
            lit(b"", false, &mut b);
            blocks.push(b);
        }
        let mut ok = 0;
        for (i, b) in blocks.iter().enumerate() {
            let want = reference.decode(b).map_err(|_| ());
            let got = ours(&mut d, b).map_err(|_| ());
            assert_eq!(got, want, "block {i}");
            ok += usize::from(got.is_ok());
        }
        // The shrunk table makes a few references dangle, for both decoders alike; the
        // rest decode.
        assert!(ok >= 290, "only {ok} of 300 blocks decoded");
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut d = Decoder::new(4096);
        for (block, want) in [
            (&[0x80][..], HpackError::BadIndex(0)),
            (&[0xbe], HpackError::BadIndex(62)),
            (&[0x00, 0x05, b'a'], HpackError::Truncated),
            (&[0x3f, 0x81, 0x20], HpackError::TableTooLarge(4128, 4096)),
            (&[0x82, 0x20], HpackError::LateSizeUpdate),
            (&[0x20], HpackError::SizeUpdateAtEnd),
            (&[0x00, 0x81, 0xff, 0x81, 0x00], HpackError::Huffman),
            // Five '0' symbols (5 bits each) padded with zero bits instead of ones.
            (&[0x00, 0x84, 0, 0, 0, 0, 0x00], HpackError::Huffman),
        ] {
            assert_eq!(ours(&mut d, block), Err(want), "{block:?}");
        }
    }

    #[test]
    fn the_table_stays_within_its_size() {
        let mut d = Decoder::new(4096);
        for i in 0..1000usize {
            let mut b = vec![0x40];
            lit(format!("name-{i}").as_bytes(), false, &mut b);
            lit(&vec![b'x'; i % 500], true, &mut b);
            ours(&mut d, &b).unwrap();
            assert!(d.size <= 4096);
            assert_eq!(d.size, d.dynamic.iter().map(Entry::size).sum::<usize>());
        }
    }
}
