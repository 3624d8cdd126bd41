//! The decode stage: image bytes → validated RGB pixels → the model's input tensor.
//! Every way an input can be bad ends here as a [`DecodeError`] with an [`ErrorKind`],
//! never a panic: the dataflow records it and carries on.

use crate::record::ErrorKind;
use image::{ColorType, DynamicImage, ExtendedColorType, ImageDecoder, ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// Settings of the decode stage (`[decode]` in the config).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Largest accepted width or height in pixels; larger images are rejected from their
    /// header, before any pixel is allocated (Fruits-360 images are 100x100).
    pub max_dimension: u32,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            max_dimension: 4096,
        }
    }
}

/// How pixels become the model input: resize to `size`x`size` (bilinear, no crop), then
/// `(x - mean) / std` per channel, NCHW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Square input side in pixels.
    pub size: u32,
    /// Per-channel mean (R, G, B) on the 0..255 scale.
    pub mean: [f32; 3],
    /// Per-channel std (R, G, B) on the 0..255 scale.
    pub std: [f32; 3],
}

/// Why bytes could not become pixels.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What exactly was wrong.
    pub reason: String,
}

fn fail(kind: ErrorKind, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        kind,
        reason: reason.into(),
    }
}

/// Decodes a JPEG into RGB pixels, rejecting anything that is not a 3-channel JPEG
/// within the size limit.
pub fn decode(bytes: &[u8], config: &DecodeConfig) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(fail(ErrorKind::Empty, "zero-byte file"));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(ErrorKind::Read, e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(fail(
                ErrorKind::UnsupportedFormat,
                format!("{other:?} image; only JPEG is accepted"),
            ))
        }
        None => {
            return Err(fail(
                ErrorKind::NotAnImage,
                "not an image (unrecognised file signature)",
            ))
        }
    }
    check_jpeg_structure(bytes, config)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(config.max_dimension);
    limits.max_image_height = Some(config.max_dimension);
    let mut reader = reader;
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| classify(e, config))?;
    let (w, h) = decoder.dimensions();
    if w > config.max_dimension || h > config.max_dimension {
        return Err(too_large(w, h, config));
    }
    match decoder.original_color_type() {
        ExtendedColorType::Rgb8 => {}
        other => {
            return Err(fail(
                ErrorKind::ColorSpace,
                format!("{} JPEG; expected 3-channel RGB", color_name(other)),
            ))
        }
    }
    let image = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, config))?;
    if image.color() != ColorType::Rgb8 {
        return Err(fail(
            ErrorKind::ColorSpace,
            format!("decoded as {:?}; expected RGB", image.color()),
        ));
    }
    Ok(image.into_rgb8())
}

/// Checks the frame header before decoding (dimensions against the limit, so a huge
/// image is rejected without allocating), and what the JPEG decoder forgives: the number of colour components in the frame
/// header (it converts CMYK and YCCK to RGB silently), and a missing end-of-image marker
/// (it pads truncated scans with gray).
fn check_jpeg_structure(bytes: &[u8], config: &DecodeConfig) -> Result<(), DecodeError> {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return Err(fail(
                ErrorKind::Corrupt,
                format!("corrupt JPEG: no marker at byte {i}"),
            ));
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let is_frame = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_frame && i + 9 < bytes.len() {
            let h = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]) as u32;
            let w = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]) as u32;
            if w > config.max_dimension || h > config.max_dimension {
                return Err(too_large(w, h, config));
            }
            match bytes.get(i + 9) {
                Some(3) => {}
                Some(1) => {
                    return Err(fail(
                        ErrorKind::ColorSpace,
                        "grayscale JPEG; expected 3-channel RGB",
                    ))
                }
                Some(4) => {
                    return Err(fail(
                        ErrorKind::ColorSpace,
                        "CMYK JPEG; expected 3-channel RGB",
                    ))
                }
                Some(n) => {
                    return Err(fail(
                        ErrorKind::ColorSpace,
                        format!("JPEG with {n} components; expected 3 (RGB)"),
                    ))
                }
                None => break,
            }
        }
        if marker == 0xDA {
            break; // start of scan: the header is over
        }
        i += 2 + len;
    }
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(fail(
            ErrorKind::Corrupt,
            "truncated JPEG: no end-of-image marker",
        ));
    }
    Ok(())
}

fn too_large(w: u32, h: u32, config: &DecodeConfig) -> DecodeError {
    fail(
        ErrorKind::TooLarge,
        format!(
            "{w}x{h} pixels exceeds the limit of {} per side",
            config.max_dimension
        ),
    )
}

fn classify(e: image::ImageError, config: &DecodeConfig) -> DecodeError {
    match e {
        image::ImageError::Limits(_) => fail(
            ErrorKind::TooLarge,
            format!("{e}; limit is {} per side", config.max_dimension),
        ),
        other => fail(
            ErrorKind::Corrupt,
            format!("corrupt or truncated JPEG: {other}"),
        ),
    }
}

fn color_name(c: ExtendedColorType) -> String {
    match c {
        ExtendedColorType::L8
        | ExtendedColorType::L16
        | ExtendedColorType::La8
        | ExtendedColorType::La16 => "grayscale".into(),
        ExtendedColorType::Cmyk8 => "CMYK".into(),
        other => format!("{other:?}"),
    }
}

impl Preprocess {
    /// Length of the NCHW tensor for one image.
    pub fn tensor_len(&self) -> usize {
        3 * (self.size as usize) * (self.size as usize)
    }

    /// Writes the normalised NCHW tensor of `image` into `out` (reused between images,
    /// so steady-state ingestion allocates no input tensors).
    pub fn tensor_into(&self, image: &RgbImage, out: &mut Vec<f32>) {
        self.normalize_into(&self.resized(image), out);
    }

    /// The image's RGB pixels at `size`x`size`, row-major (3 bytes per pixel).
    pub fn resized(&self, image: &RgbImage) -> Vec<u8> {
        if image.width() == self.size && image.height() == self.size {
            image.as_raw().clone()
        } else {
            resize(image, self.size)
        }
    }

    /// Writes the normalised NCHW tensor of `size`x`size` RGB pixels into `out`.
    pub fn normalize_into(&self, pixels: &[u8], out: &mut Vec<f32>) {
        let plane = (self.size * self.size) as usize;
        debug_assert_eq!(pixels.len(), 3 * plane);
        out.clear();
        out.resize(3 * plane, 0.0);
        for (i, p) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (p[c] as f32 - self.mean[c]) / self.std[c];
            }
        }
    }
}

/// Bilinear resize of RGB pixels to `size`x`size` (fast_image_resize: SIMD, picked at run
/// time; the image crate's scalar resize was half of the decode stage's time).
fn resize(image: &RgbImage, size: u32) -> Vec<u8> {
    use fast_image_resize::{images::Image, images::ImageRef, FilterType, PixelType};
    use fast_image_resize::{ResizeAlg, ResizeOptions, Resizer};
    let src = ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        PixelType::U8x3,
    )
    .expect("an RgbImage buffer holds width x height RGB pixels");
    let mut dst = Image::new(size, size, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides, and u8 RGB needs no alignment");
    dst.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(color: image::ExtendedColorType, w: u32, h: u32) -> Vec<u8> {
        let channels = if color == ExtendedColorType::L8 { 1 } else { 3 };
        let pixels = vec![128u8; (w * h * channels) as usize];
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut out)
            .encode(&pixels, w, h, color)
            .unwrap();
        out
    }

    #[test]
    fn accepts_rgb_jpeg_and_builds_nchw_tensor() {
        let img = decode(
            &jpeg(ExtendedColorType::Rgb8, 100, 100),
            &DecodeConfig::default(),
        )
        .unwrap();
        let pre = Preprocess {
            size: 8,
            mean: [127.0; 3],
            std: [128.0; 3],
        };
        let mut t = Vec::new();
        pre.tensor_into(&img, &mut t);
        assert_eq!(t.len(), pre.tensor_len());
        assert!(t.iter().all(|v| v.abs() < 0.05), "mid-gray maps near zero");
    }

    #[test]
    fn rejects_each_bad_input_with_its_kind() {
        let cfg = DecodeConfig::default();
        let kind = |b: &[u8]| decode(b, &cfg).unwrap_err().kind;
        assert_eq!(kind(b""), ErrorKind::Empty);
        assert_eq!(kind(b"hello, I am text"), ErrorKind::NotAnImage);
        assert_eq!(
            kind(&jpeg(ExtendedColorType::L8, 10, 10)),
            ErrorKind::ColorSpace
        );
        let good = jpeg(ExtendedColorType::Rgb8, 64, 64);
        assert_eq!(kind(&good[..good.len() / 3]), ErrorKind::Corrupt);
        let small = DecodeConfig { max_dimension: 32 };
        assert_eq!(decode(&good, &small).unwrap_err().kind, ErrorKind::TooLarge);
    }
}
