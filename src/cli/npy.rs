//! Reading and writing .npy files (f32 and f16, little-endian, C order). The reader trusts
//! nothing in a file: the header length is checked against the file's size before the header
//! is read, the shape's element count against overflow and against the data actually there
//! (exactly), and memory is reserved fallibly, so any bytes give a tensor or a one-line error,
//! never a panic or an abort.

use super::CliResult;
use flashattn::{DType, Tensor};
use half::f16;
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy itself refuses headers over 10000 bytes unless told otherwise.
const MAX_HEADER: u64 = 1 << 16;
/// Data and header start at a multiple of this (numpy's alignment).
const ALIGN: usize = 64;

/// A tensor read from a .npy file: its shape and values in the file's dtype.
#[derive(Debug)]
pub struct NpyTensor {
    pub shape: Vec<usize>,
    pub data: Tensor,
}

pub fn read(path: &Path) -> CliResult<NpyTensor> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    parse(std::io::BufReader::new(file), len).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a .npy stream of `len` bytes.
pub fn parse(mut r: impl Read, len: u64) -> CliResult<NpyTensor> {
    let invalid = |why: String| format!("not a valid .npy file: {why}");
    let mut preamble = [0u8; 8];
    r.read_exact(&mut preamble)
        .map_err(|_| invalid("shorter than the 8-byte preamble".into()))?;
    if &preamble[..6] != MAGIC {
        return Err(invalid("it does not start with \\x93NUMPY".into()));
    }
    let (major, minor) = (preamble[6], preamble[7]);
    let len_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => return Err(invalid(format!("unknown format version {major}.{minor}"))),
    };
    let mut raw = [0u8; 4];
    r.read_exact(&mut raw[..len_bytes])
        .map_err(|_| invalid("the header length is cut off".into()))?;
    let header_len = u32::from_le_bytes(raw) as u64;
    let data_start = 8 + len_bytes as u64 + header_len;
    if data_start > len {
        return Err(invalid(format!(
            "the header claims {header_len} bytes but the file has {len}"
        )));
    }
    if header_len > MAX_HEADER {
        return Err(invalid(format!(
            "a header of {header_len} bytes is longer than {MAX_HEADER}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    r.read_exact(&mut header)
        .map_err(|e| invalid(format!("cannot read the header: {e}")))?;
    let header = Header::parse(&header).map_err(invalid)?;
    let dtype = match header.descr.as_str() {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        other => {
            return Err(format!(
                "dtype {other} is not supported (use float32 '<f4' or float16 '<f2')"
            ))
        }
    };
    if header.fortran_order {
        return Err("Fortran-ordered arrays are not supported; save it in C order".into());
    }
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(dtype.size_bytes()).is_some())
        .ok_or_else(|| invalid(format!("shape {:?} overflows", header.shape)))?;
    let bytes = (count * dtype.size_bytes()) as u64;
    if len - data_start != bytes {
        return Err(invalid(format!(
            "shape {:?} of {dtype} needs {bytes} bytes of data but the file has {}",
            header.shape,
            len - data_start
        )));
    }
    let data = match dtype {
        DType::F16 => Tensor::F16(read_values(&mut r, count, |x: f16| {
            f16::from_bits(u16::from_le(x.to_bits()))
        })?),
        _ => Tensor::F32(read_values(&mut r, count, |x: f32| {
            f32::from_bits(u32::from_le(x.to_bits()))
        })?),
    };
    Ok(NpyTensor {
        shape: header.shape,
        data,
    })
}

/// Reads `count` little-endian values; `from_le` turns one read as native bytes into its value.
fn read_values<T: bytemuck::Pod>(
    r: &mut impl Read,
    count: usize,
    from_le: fn(T) -> T,
) -> CliResult<Vec<T>> {
    let mut values: Vec<T> = Vec::new();
    values.try_reserve_exact(count).map_err(|_| {
        format!(
            "cannot allocate {} bytes for the data",
            count.saturating_mul(size_of::<T>())
        )
    })?;
    values.resize(count, T::zeroed());
    r.read_exact(bytemuck::cast_slice_mut(&mut values))
        .map_err(|e| format!("cannot read the data: {e}"))?;
    if cfg!(target_endian = "big") {
        values.iter_mut().for_each(|x| *x = from_le(*x));
    }
    Ok(values)
}

/// The header dictionary: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, String> {
        let mut c = Cursor { s: bytes, i: 0 };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        c.expect(b'{')?;
        loop {
            if c.eat(b'}') {
                break;
            }
            let key = c.string()?;
            c.expect(b':')?;
            match key.as_str() {
                "descr" => descr = Some(c.string()?),
                "fortran_order" => fortran = Some(c.boolean()?),
                "shape" => shape = Some(c.tuple()?),
                other => return Err(format!("unknown header key '{other}'")),
            }
            if !c.eat(b',') {
                c.expect(b'}')?;
                break;
            }
        }
        c.skip_space();
        if c.i != bytes.len() {
            return Err("text after the header dictionary".into());
        }
        let missing = |k: &str| format!("the header has no '{k}'");
        Ok(Header {
            descr: descr.ok_or_else(|| missing("descr"))?,
            fortran_order: fortran.ok_or_else(|| missing("fortran_order"))?,
            shape: shape.ok_or_else(|| missing("shape"))?,
        })
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_space(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    /// Consumes `c` (after blanks) if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        let found = self.s.get(self.i) == Some(&c);
        self.i += found as usize;
        found
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            return Ok(());
        }
        Err(format!(
            "expected '{}' at byte {} of the header",
            c as char, self.i
        ))
    }

    /// A quoted string without escapes.
    fn string(&mut self) -> Result<String, String> {
        self.skip_space();
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "expected a string at byte {} of the header",
                    self.i
                ))
            }
        };
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .position(|&b| b == quote)
            .ok_or("an unterminated string in the header")?;
        let text = &self.s[start..start + len];
        self.i = start + len + 1;
        if text.contains(&b'\\') || !text.is_ascii() {
            return Err("an escaped or non-ASCII string in the header".into());
        }
        Ok(String::from_utf8_lossy(text).into_owned())
    }

    fn boolean(&mut self) -> Result<bool, String> {
        self.skip_space();
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(value);
            }
        }
        Err("fortran_order must be True or False".into())
    }

    /// `()`, `(n,)` or `(n, m, ...)` of non-negative integers (Python 2's `3L` allowed).
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(b')') {
                return Ok(dims);
            }
            self.skip_space();
            let digits = self.s[self.i..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let text = std::str::from_utf8(&self.s[self.i..self.i + digits]).unwrap_or("");
            let dim: usize = text
                .parse()
                .map_err(|_| format!("a bad shape entry at byte {} of the header", self.i))?;
            self.i += digits;
            self.eat(b'L');
            dims.push(dim);
            if dims.len() > 32 {
                return Err("a shape of more than 32 dimensions".into());
            }
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// Writes `values` with `shape` as a version 1.0 .npy stream of f32, or of f16 for `DType::F16`.
pub fn write(
    w: &mut dyn Write,
    shape: &[usize],
    values: &[f32],
    dtype: DType,
) -> std::io::Result<()> {
    let descr = if dtype == DType::F16 { "<f2" } else { "<f4" };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    let total = (10 + header.len() + 1).div_ceil(ALIGN) * ALIGN;
    header.extend(std::iter::repeat_n(' ', total - 10 - header.len() - 1));
    header.push('\n');
    w.write_all(MAGIC)?;
    w.write_all(&[1, 0])?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for x in values {
        match dtype {
            DType::F16 => w.write_all(&f16::from_f32(*x).to_bits().to_le_bytes())?,
            _ => w.write_all(&x.to_le_bytes())?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The reader under fuzzing: any bytes, valid files with a byte changed or cut short,
    //! headers of random text. Each gives a tensor or an error, never a panic.

    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn parse_bytes(bytes: &[u8]) -> CliResult<NpyTensor> {
        parse(bytes, bytes.len() as u64)
    }

    fn file(shape: &[usize], dtype: DType) -> Vec<u8> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut bytes = Vec::new();
        write(&mut bytes, shape, &values, dtype).unwrap();
        bytes
    }

    fn shapes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(0usize..6, 0..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn any_bytes_are_a_tensor_or_an_error(
            tail in prop::collection::vec(any::<u8>(), 0..200),
            magic in any::<bool>(),
        ) {
            let mut bytes = if magic { b"\x93NUMPY".to_vec() } else { Vec::new() };
            bytes.extend(tail);
            let _ = parse_bytes(&bytes);
        }

        #[test]
        fn changed_or_cut_files_are_a_tensor_or_an_error(
            shape in shapes(),
            f16 in any::<bool>(),
            at in any::<Index>(),
            byte in any::<u8>(),
            cut in any::<Index>(),
            claimed in 0u64..1 << 40,
        ) {
            let dtype = if f16 { DType::F16 } else { DType::F32 };
            let mut bytes = file(&shape, dtype);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = parse_bytes(&bytes);
            let _ = parse_bytes(&bytes[..cut.index(bytes.len())]);
            // A stream shorter or longer than the length it is said to have.
            let _ = parse(&bytes[..], claimed);
        }

        #[test]
        fn headers_of_random_text_are_a_tensor_or_an_error(
            header in "\\{[ '\"a-z_:,()0-9<>TrueFalsL\\\\]{0,90}\\}[ \n]{0,3}",
            data in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(data);
            let _ = parse_bytes(&bytes);
        }

        #[test]
        fn what_is_written_reads_back_exactly(shape in shapes(), f16 in any::<bool>()) {
            let dtype = if f16 { DType::F16 } else { DType::F32 };
            let bytes = file(&shape, dtype);
            let n: usize = shape.iter().product();
            prop_assert_eq!((bytes.len() - n * dtype.size_bytes()) % ALIGN, 0, "data is aligned");
            let t = parse_bytes(&bytes).unwrap();
            prop_assert_eq!(&t.shape, &shape);
            prop_assert_eq!(t.data.dtype(), dtype);
            let want: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let want = Tensor::from_f32(dtype, &want);
            prop_assert_eq!(t.data, want);
        }
    }

    #[test]
    fn numpy_headers_parse() {
        let h = Header::parse(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n")
            .unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("<f4", false, vec![2, 3])
        );
        let h = Header::parse(b"{\"shape\": (5L,), \"fortran_order\": True, \"descr\": \"<f2\"}")
            .unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("<f2", true, vec![5])
        );
        assert_eq!(
            Header::parse(b"{'descr':'<f4','fortran_order':False,'shape':()}")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
        for bad in [
            &b"{'descr': '<f4', 'shape': (2,)}"[..],
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
            b"{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,)}",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} trailing",
            b"{'descr': '<f4",
        ] {
            assert!(
                Header::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
