//! Image files in and out, and their conversion to and from the `[-1, 1]` tensors the VAE takes.
//!
//! Input honours the EXIF orientation (a phone photo comes out upright); the alpha channel is
//! dropped as PIL's `convert("RGB")` does in diffusers. Output is PNG, written atomically
//! ([`crate::atomic`]), so a failure or interruption never leaves half a file.

mod contact_sheet;
mod font;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{ImageDecoder, ImageReader, RgbImage};

pub use self::contact_sheet::contact_sheet;
use crate::atomic::write_atomic;
use crate::{Error, Result};

/// The most pixels an input picture may have: 100 megapixels (a 200 MP phone photo must be
/// downscaled first). Decoding happens only after the header's size is checked against it, so a
/// file claiming 100000 x 100000 pixels is refused rather than aborting on a 30 GB allocation.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Why [`decode_upright`] could not read a picture.
#[derive(Debug)]
pub enum DecodeError {
    /// The header says `width` x `height` with no pixel.
    Empty { width: u32, height: u32 },
    /// The header says more pixels than allowed; nothing was decoded.
    TooLarge { width: u32, height: u32 },
    /// Not a picture the decoders read, or a corrupt one.
    Decode(String),
}

/// Decodes a PNG, JPEG or WebP upright (EXIF orientation) to RGB, refusing from the header,
/// before any pixel is decoded, a picture of more than `max_pixels` pixels. Files and uploads
/// share it.
pub fn decode_upright<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    max_pixels: u64,
) -> std::result::Result<RgbImage, DecodeError> {
    let decode = |e: image::ImageError| DecodeError::Decode(e.to_string());
    let mut decoder = reader.into_decoder().map_err(decode)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(DecodeError::Empty { width, height });
    }
    if pixels > max_pixels {
        return Err(DecodeError::TooLarge { width, height });
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| DecodeError::Decode(format!("bad EXIF orientation: {e}")))?;
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(decode)?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

/// Reads a PNG, JPEG or WebP file as upright RGB.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    decode_upright(reader, MAX_PIXELS).map_err(|e| match e {
        DecodeError::Empty { width, height } => {
            err(format!("the picture is {width}x{height}: it has no pixels"))
        }
        DecodeError::TooLarge { width, height } => err(format!(
            "the picture is {width}x{height} ({} megapixels); unitune reads at most {} \
             megapixels: downscale it first",
            u64::from(width) * u64::from(height) / 1_000_000,
            MAX_PIXELS / 1_000_000
        )),
        DecodeError::Decode(message) if message.starts_with("bad EXIF") => err(message),
        DecodeError::Decode(message) => err(format!("cannot decode: {message}")),
    })
}

/// Resizes to exactly `width` x `height` (Lanczos3) when the size differs.
pub fn resize(image: RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image;
    }
    image::imageops::resize(&image, width, height, image::imageops::FilterType::Lanczos3)
}

/// Scales `image` to cover `width` x `height` (aspect kept, Lanczos3), then crops the centre: the
/// rule DreamBooth-style training uses (`Resize(shorter side)` + `CenterCrop`).
pub fn resize_and_center_crop(image: RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image;
    }
    let scale = f64::max(width as f64 / w as f64, height as f64 / h as f64);
    let (sw, sh) = (
        ((w as f64 * scale).round() as u32).max(width),
        ((h as f64 * scale).round() as u32).max(height),
    );
    let scaled = resize(image, sw, sh);
    image::imageops::crop_imm(&scaled, (sw - width) / 2, (sh - height) / 2, width, height)
        .to_image()
}

/// `[1, 3, h, w]` f32 in `[-1, 1]`, as diffusers' `VaeImageProcessor.preprocess`.
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data = Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), device)?;
    let x = data.permute((2, 0, 1))?.to_dtype(DType::F32)?; // [3, h, w] in 0..=255
    Ok(((x / 127.5)? - 1.0)?.unsqueeze(0)?)
}

/// One image of a `[b, 3, h, w]` batch in `[-1, 1]` to 8-bit RGB, as diffusers' `postprocess`
/// (`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded).
pub fn tensor_to_image(images: &Tensor, index: usize) -> Result<RgbImage> {
    let x = images.get(index)?.to_dtype(DType::F32)?; // [3, h, w]
    let (_, h, w) = x.dims3()?;
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let bytes: Vec<u8> = (x * 255.0)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1()?;
    Ok(RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer matches the image size"))
}

/// Saves `image` as PNG at `path`, atomically.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    write_atomic(path, |tmp| {
        image
            .save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                message: format!("cannot write PNG: {e}"),
            })
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("unitune-image-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tensor_round_trip_is_exact() {
        let image = RgbImage::from_fn(5, 3, |x, y| {
            image::Rgb([(x * 50) as u8, (y * 100) as u8, 255])
        });
        let t = image_to_tensor(&image, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        let min = t.min_all().unwrap().to_scalar::<f32>().unwrap();
        let max = t.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!((min, max), (-1.0, 1.0));
        assert_eq!(tensor_to_image(&t, 0).unwrap(), image);
    }

    #[test]
    fn cover_and_centre_crop() {
        // A 40x20 image, left half red, right half blue, to 10x10: scaled to 20x10, centre kept.
        let image = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let out = resize_and_center_crop(image, 10, 10);
        assert_eq!(out.dimensions(), (10, 10));
        assert!(out.get_pixel(1, 5)[0] > 200 && out.get_pixel(8, 5)[2] > 200);
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 2x1 JPEG tagged "rotate 90 CW" (orientation 6) must load as 1x2.
        let dir = tempdir("exif");
        let path = dir.join("rotated.jpg");
        let mut jpeg = Vec::new();
        let image = RgbImage::from_fn(16, 8, |x, _| {
            if x < 8 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&image)
            .unwrap();
        // APP1 Exif segment, big-endian TIFF with one IFD entry: Orientation (0x0112) = 6.
        let tiff: Vec<u8> = [
            b"MM\0\x2a".as_slice(),
            &[0, 0, 0, 8],
            &[0, 1],
            &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0],
            &[0, 0, 0, 0],
        ]
        .concat();
        let payload = [b"Exif\0\0".as_slice(), &tiff].concat();
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(&payload);
        let tagged = [&jpeg[..2], &app1, &jpeg[2..]].concat();
        std::fs::write(&path, tagged).unwrap();
        let loaded = load_image(&path).unwrap();
        assert_eq!(loaded.dimensions(), (8, 16));
        // Rotating 90 degrees clockwise puts the left (red) half on top.
        assert!(loaded.get_pixel(4, 2)[0] > 200 && loaded.get_pixel(4, 13)[2] > 200);
    }

    #[test]
    fn undecodable_file_names_the_path() {
        let dir = tempdir("bad");
        let path = dir.join("not-an-image.png");
        std::fs::write(&path, b"hello").unwrap();
        let err = load_image(&path).unwrap_err().to_string();
        assert!(err.contains("not-an-image.png"), "{err}");
    }

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = tempdir("atomic");
        let path = dir.join("out.png");
        std::fs::write(&path, b"old").unwrap();
        let failed = write_atomic(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::argument("test", "interrupted"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left behind"
        );
        save_png(&RgbImage::new(2, 2), &path).unwrap();
        assert_eq!(load_image(&path).unwrap().dimensions(), (2, 2));
    }
}
