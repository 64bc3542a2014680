//! Decoding pictures that come over the network. The size is read from the header and checked
//! before any pixel is decoded, and the decoder itself is held to the same bound, so a small file
//! claiming a huge picture (a decompression bomb) is refused without the allocation.

use std::io::Cursor;

use image::{ImageReader, Limits, RgbImage};
use unitune::image_io::{decode_upright, DecodeError};

/// Decodes a PNG, JPEG or WebP upright (EXIF orientation) to RGB, refusing pictures of more than
/// `max_pixels` pixels.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the picture: {e}"))?;
    // The decoded RGBA picture at 16 bits per channel, and room for the decoder's own buffers.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels * 8 + (64 << 20));
    reader.limits(limits);
    decode_upright(reader, max_pixels).map_err(|e| match e {
        DecodeError::Empty { width, height } => {
            format!("the picture is {width}x{height}: nothing to edit")
        }
        DecodeError::TooLarge { width, height } => format!(
            "the picture is {width}x{height}, above the limit of {max_pixels} pixels; scale it down first"
        ),
        DecodeError::Decode(message) => format!("not a PNG, JPEG or WebP picture ({message})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = vec![];
        RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn decodes_within_the_limit_and_refuses_beyond_it() {
        assert_eq!(decode_image(&png(6, 4), 24).unwrap().dimensions(), (6, 4));
        let err = decode_image(&png(6, 4), 23).unwrap_err();
        assert!(err.contains("6x4") && err.contains("limit"), "{err}");
        assert!(decode_image(b"hello", 100)
            .unwrap_err()
            .contains("not a PNG"));
    }

    /// `png` with its IHDR claiming `side` x `side` pixels, CRC and all.
    fn claiming(mut png: Vec<u8>, side: u32) -> Vec<u8> {
        png[16..20].copy_from_slice(&side.to_be_bytes());
        png[20..24].copy_from_slice(&side.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    #[test]
    fn a_header_claiming_a_huge_picture_is_refused_before_decoding() {
        // A 1x1 PNG whose IHDR says 100000 x 100000: 30 GB decoded, refused from the header.
        let err = decode_image(&claiming(png(1, 1), 100_000), 50_000_000).unwrap_err();
        assert!(
            err.contains("100000x100000") && err.contains("limit"),
            "{err}"
        );
    }
}
