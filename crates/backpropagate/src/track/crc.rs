//! The two reflected CRC-32s the trackers' file formats use, from one table builder:
//! CRC-32C (Castagnoli) for TensorBoard's TFRecords, CRC-32 (IEEE, zlib's) for W&B's
//! transaction log.

/// The byte table of the reflected CRC-32 with polynomial `poly`.
const fn table(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

fn crc(table: &[u32; 256], data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// CRC-32C (Castagnoli).
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = table(0x82F6_3B78);
    crc(&TABLE, data)
}

/// CRC-32 (IEEE, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = table(0xEDB8_8320);
    crc(&TABLE, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crcs_match_the_published_check_values() {
        // RFC 3720's CRC-32C check value, TensorFlow's, and zlib's CRC-32.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
