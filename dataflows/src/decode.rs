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
    let reader = open_reader(bytes, &[ImageFormat::Jpeg], "only JPEG is accepted")?;
    check_jpeg_structure(bytes, config, Components::Rgb)?;
    let decoder = limited_decoder(reader, config)?;
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

/// The photo formats [`decode_photo`] accepts, as MIME types (what `POST /classify`
/// takes as Content-Type, besides `application/octet-stream`).
pub const PHOTO_TYPES: [&str; 3] = ["image/jpeg", "image/png", "image/webp"];

/// The MIME type of a photo's bytes from their signature, or why it is not one
/// [`decode_photo`] accepts.
pub fn photo_type(bytes: &[u8]) -> Result<&'static str, String> {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Ok("image/jpeg"),
        Ok(ImageFormat::Png) => Ok("image/png"),
        Ok(ImageFormat::WebP) => Ok("image/webp"),
        Ok(other) => Err(format!("{other:?} image; send JPEG, PNG or WebP")),
        Err(_) => Err("not a JPEG, PNG or WebP image (unrecognised signature)".into()),
    }
}

/// Decodes a photo a person sends (the app's `classify`, not the archive): JPEG with its
/// EXIF orientation applied, PNG or WebP, any colour type (grayscale and CMYK become RGB,
/// transparency is composited over white, as a cut-out fruit is usually shown). The
/// archive keeps the strict rules of [`decode`]: its images are training data, where a
/// silently converted file would be a silent change of statistics.
pub fn decode_photo(bytes: &[u8], config: &DecodeConfig) -> Result<RgbImage, DecodeError> {
    let reader = open_reader(
        bytes,
        &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP],
        "JPEG, PNG and WebP are accepted",
    )?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        // The JPEG decoder pads a truncated upload with gray: refuse it instead.
        check_jpeg_structure(bytes, config, Components::Any)?;
    }
    let mut decoder = limited_decoder(reader, config)?;
    // A missing or unreadable orientation tag means "as stored".
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, config))?;
    image.apply_orientation(orientation);
    Ok(over_white(image))
}

/// A reader for `bytes` when their signature is one of `accepted` (`refusal` says what
/// is, for any other image).
fn open_reader<'a>(
    bytes: &'a [u8],
    accepted: &[ImageFormat],
    refusal: &str,
) -> Result<image::ImageReader<Cursor<&'a [u8]>>, DecodeError> {
    if bytes.is_empty() {
        return Err(fail(ErrorKind::Empty, "zero-byte file"));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(ErrorKind::Read, e.to_string()))?;
    match reader.format() {
        Some(f) if accepted.contains(&f) => Ok(reader),
        Some(other) => Err(fail(
            ErrorKind::UnsupportedFormat,
            format!("{other:?} image; {refusal}"),
        )),
        None => Err(fail(
            ErrorKind::NotAnImage,
            "not an image (unrecognised file signature)",
        )),
    }
}

/// The reader's decoder under the size limit, refused from the header when too large.
fn limited_decoder<'a>(
    mut reader: image::ImageReader<Cursor<&'a [u8]>>,
    config: &DecodeConfig,
) -> Result<impl ImageDecoder + 'a, DecodeError> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(config.max_dimension);
    limits.max_image_height = Some(config.max_dimension);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| classify(e, config))?;
    let (w, h) = decoder.dimensions();
    if w > config.max_dimension || h > config.max_dimension {
        return Err(too_large(w, h, config));
    }
    Ok(decoder)
}

/// RGB pixels of any decoded image; transparent pixels are blended over white.
fn over_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// Checks the frame header before decoding (dimensions against the limit, so a huge
/// image is rejected without allocating), and what the JPEG decoder forgives: the number of colour components in the frame
/// header (it converts CMYK and YCCK to RGB silently), and a missing end-of-image marker
/// (it pads truncated scans with gray).
fn check_jpeg_structure(
    bytes: &[u8],
    config: &DecodeConfig,
    components: Components,
) -> Result<(), DecodeError> {
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
                // A photo may be grayscale or CMYK: the decoder converts it.
                _ if components == Components::Any => {}
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

/// Which JPEG colour components [`check_jpeg_structure`] accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Components {
    /// Three (RGB/YCbCr) only: the archive's rule.
    Rgb,
    /// Any: a photo is converted to RGB.
    Any,
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
            format!("corrupt or truncated image: {other}"),
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
        out.clear();
        self.normalize_append(pixels, out);
    }

    /// Appends the normalised NCHW tensor of `pixels` to `out` (a batch is its images'
    /// tensors end to end).
    pub fn normalize_append(&self, pixels: &[u8], out: &mut Vec<f32>) {
        let plane = (self.size * self.size) as usize;
        debug_assert_eq!(pixels.len(), 3 * plane);
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let image = &mut out[start..];
        for (i, p) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                image[c * plane + i] = (p[c] as f32 - self.mean[c]) / self.std[c];
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
    // One resizer per thread: a new one allocates and zeroes its intermediate buffer and
    // detects the CPU's features for every image.
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    RESIZER.with_borrow_mut(|resizer| {
        resizer
            .resize(&src, &mut dst, &options)
            .expect("same pixel type on both sides, and u8 RGB needs no alignment")
    });
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

    /// Left half red, right half blue, `w`x`h` RGB pixels.
    fn two_colours(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        })
    }

    #[test]
    fn photos_apply_exif_orientation() {
        use image::ImageEncoder;
        // A minimal little-endian TIFF/EXIF block: one IFD entry, Orientation = 6
        // (the camera was turned: rotate 90 degrees clockwise to view).
        let mut exif = b"II*\0\x08\0\0\0\x01\0".to_vec();
        exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let pixels = two_colours(40, 20);
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
        encoder.set_exif_metadata(exif).unwrap();
        encoder
            .write_image(pixels.as_raw(), 40, 20, ExtendedColorType::Rgb8)
            .unwrap();
        let photo = decode_photo(&jpeg, &DecodeConfig::default()).unwrap();
        assert_eq!(photo.dimensions(), (20, 40), "turned upright");
        assert!(
            photo.get_pixel(10, 2)[0] > 200,
            "the left (red) side is now on top"
        );
        assert!(photo.get_pixel(10, 37)[2] > 200, "blue at the bottom");
        // The archive decoder is unchanged: stored as is.
        assert_eq!(
            decode(&jpeg, &DecodeConfig::default())
                .unwrap()
                .dimensions(),
            (40, 20)
        );
    }

    #[test]
    fn photos_accept_png_with_alpha_and_webp() {
        use image::ImageEncoder;
        let rgba = image::RgbaImage::from_fn(8, 8, |x, _| {
            if x < 4 {
                image::Rgba([0, 200, 0, 255])
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        });
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(rgba.as_raw(), 8, 8, ExtendedColorType::Rgba8)
            .unwrap();
        let photo = decode_photo(&png, &DecodeConfig::default()).unwrap();
        assert_eq!(photo.get_pixel(1, 1).0, [0, 200, 0]);
        assert_eq!(
            photo.get_pixel(6, 1).0,
            [255, 255, 255],
            "transparent over white"
        );
        assert_eq!(
            decode(&png, &DecodeConfig::default()).unwrap_err().kind,
            ErrorKind::UnsupportedFormat,
            "the archive stays JPEG-only"
        );
        let mut webp = Vec::new();
        let pixels = two_colours(16, 16);
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(pixels.as_raw(), 16, 16, ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(
            decode_photo(&webp, &DecodeConfig::default()).unwrap(),
            pixels
        );
        // Grayscale JPEG: refused by the archive, converted for a photo.
        let gray = jpeg(ExtendedColorType::L8, 10, 10);
        assert_eq!(
            decode_photo(&gray, &DecodeConfig::default())
                .unwrap()
                .dimensions(),
            (10, 10)
        );
        let cfg = DecodeConfig::default();
        let gif = b"GIF89a\x01\0\x01\0\0\0\0;";
        assert_eq!(
            decode_photo(gif, &cfg).unwrap_err().kind,
            ErrorKind::UnsupportedFormat
        );
        assert_eq!(
            decode_photo(b"text", &cfg).unwrap_err().kind,
            ErrorKind::NotAnImage
        );
        let small = DecodeConfig { max_dimension: 4 };
        assert_eq!(
            decode_photo(&png, &small).unwrap_err().kind,
            ErrorKind::TooLarge
        );
        let good = jpeg(ExtendedColorType::Rgb8, 64, 64);
        assert_eq!(
            decode_photo(&good[..good.len() / 2], &cfg)
                .unwrap_err()
                .kind,
            ErrorKind::Corrupt,
            "a truncated upload is refused, not padded"
        );
    }
}
