//! Bounded decoding of JPEG, PNG, WebP and BMP bytes into 8-bit RGB.

use std::io::Cursor;

use image::error::ImageError;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::{ApiError, ErrorKind};

/// Upper bounds applied to every uploaded image before its pixels are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted decoded pixel buffer, in bytes: the larger of the decoder's native buffer
    /// (e.g. 8 bytes per pixel for 16-bit RGBA) and the 8-bit RGB result. Peak memory per
    /// decode is a small multiple of this (the input copy, conversion to RGB, a rotated copy
    /// for EXIF orientation, and a progressive JPEG's coefficient planes).
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    /// 8192 px per side and 256 MiB: enough for any camera photo, far below a bomb.
    fn default() -> Self {
        Self {
            max_side: 8192,
            max_decoded_bytes: 256 * 1024 * 1024,
        }
    }
}

const UNKNOWN_FORMAT: &str = "not a JPEG, PNG, WebP or BMP image";

/// Decodes `bytes` into 8-bit RGB with EXIF orientation applied.
///
/// The header is read first and the image refused (`ImageTooLarge`) if its dimensions or decoded
/// size exceed `limits`, so a small file declaring a huge canvas never gets its buffer allocated.
/// The same limits are also handed to the decoder as a second guard on its internal allocations.
/// Alpha is dropped (not composited), grey is replicated to RGB and 16-bit samples are rounded to
/// 8 bits.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ApiError> {
    decode_admitted(bytes, limits, |_| Ok(())).map(|(_, img)| img)
}

/// `decode`, calling `admit` with the size `decoded_size` reports before any pixel buffer is
/// allocated (to reserve memory for it); what `admit` returns comes back with the image. The
/// header is read once, not once for the size and again for the decode.
pub fn decode_admitted<G>(
    bytes: &[u8],
    limits: &DecodeLimits,
    admit: impl FnOnce(u64) -> Result<G, ApiError>,
) -> Result<(G, RgbImage), ApiError> {
    let Header {
        mut decoder,
        format,
        width,
        height,
        decoded_bytes,
    } = header(bytes, limits)?;
    let admitted = admit(decoded_bytes)?;
    // A malformed EXIF block should not cost the user their upload: fall back to no rotation.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = if format == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(decode_jpeg_strictly(bytes, width, height)?)
    } else {
        DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, format, limits))?
    };
    img.apply_orientation(orientation);
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    Ok((admitted, rgb))
}

/// The bytes `decode` will allocate for its pixel buffer, read from the header alone (with the
/// same refusals as `decode`), so a caller can reserve memory before decoding.
pub fn decoded_size(bytes: &[u8], limits: &DecodeLimits) -> Result<u64, ApiError> {
    header(bytes, limits).map(|h| h.decoded_bytes)
}

struct Header<D> {
    decoder: D,
    format: ImageFormat,
    width: u32,
    height: u32,
    decoded_bytes: u64,
}

fn header<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Header<impl ImageDecoder + 'a>, ApiError> {
    if bytes.is_empty() {
        return Err(bad_image("image data is empty"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad_image(format!("could not read image data: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Bmp)) => {
            f
        }
        _ => return Err(bad_image(UNKNOWN_FORMAT)),
    };
    // zune-jpeg (non-strict, as `image` configures it) fills a cut-off scan with grey instead of
    // failing, so a truncated upload would silently embed a half-grey face.
    if format == ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        return Err(bad_image("JPEG data is truncated (no end-of-image marker)"));
    }

    let mut guard = image::Limits::default();
    guard.max_image_width = Some(limits.max_side);
    guard.max_image_height = Some(limits.max_side);
    guard.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(guard);

    // Building the decoder parses only the header (and applies the dimension limits above).
    let decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, format, limits))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(bad_image(format!(
            "{} image has no pixels ({width}x{height})",
            name(format)
        )));
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(too_large_side(width, height, limits));
    }
    let rgb_bytes = u64::from(width) * u64::from(height) * 3;
    let decoded_bytes = decoder.total_bytes().max(rgb_bytes);
    if decoded_bytes > limits.max_decoded_bytes {
        return Err(ApiError::new(
            ErrorKind::ImageTooLarge,
            format!(
                "image is {width}x{height}, which decodes to {decoded_bytes} bytes; the limit is {} bytes",
                limits.max_decoded_bytes
            ),
        ));
    }
    Ok(Header {
        decoder,
        format,
        width,
        height,
        decoded_bytes,
    })
}

/// JPEG pixels through zune-jpeg, straight to RGB. zune-jpeg (strict or not) treats an
/// end-of-image marker met inside a scan as "the rest is zeros" and fills the missing blocks
/// with grey, so a file cut short with an end marker appended would embed as a half-grey face.
/// A sequential JPEG is therefore decoded without its end marker, in strict mode: a complete
/// scan never needs bytes past its data, a cut one runs out and is refused. (A progressive
/// JPEG cut short loses refinement scans, not blocks: it decodes blurred, not grey.)
fn decode_jpeg_strictly(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ApiError> {
    let layout = jpeg_layout(bytes)
        .ok_or_else(|| bad_image("JPEG data is truncated (no end-of-image marker)"))?;
    let data = if layout.progressive {
        bytes
    } else {
        &bytes[..layout.eoi]
    };
    let options = zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB)
        .set_strict_mode(!layout.progressive)
        .set_max_width(width as usize)
        .set_max_height(height as usize);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(data),
        options,
    );
    let pixels = decoder
        .decode()
        .map_err(|e| bad_image(format!("corrupt or truncated JPEG data: {e:?}")))?;
    RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| bad_image("JPEG decoded to fewer pixels than its header declares"))
}

fn name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

fn bad_image(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadImage, message)
}

fn too_large_side(width: u32, height: u32, limits: &DecodeLimits) -> ApiError {
    ApiError::new(
        ErrorKind::ImageTooLarge,
        format!(
            "image is {width}x{height}; width and height may be at most {} pixels",
            limits.max_side
        ),
    )
}

fn map_image_error(err: ImageError, format: ImageFormat, limits: &DecodeLimits) -> ApiError {
    let what = name(format);
    match err {
        ImageError::Limits(e) => ApiError::new(
            ErrorKind::ImageTooLarge,
            format!(
                "{what} image exceeds the decode limits ({} pixels per side, {} bytes decoded): {e}",
                limits.max_side, limits.max_decoded_bytes
            ),
        ),
        ImageError::IoError(e) => bad_image(format!("{what} data is truncated or unreadable: {e}")),
        ImageError::Unsupported(e) => bad_image(format!("unsupported {what} variant: {e}")),
        ImageError::Decoding(e) => bad_image(format!("corrupt {what} data: {e}")),
        other => bad_image(format!("could not decode {what} image: {other}")),
    }
}

/// Where a JPEG's end-of-image marker is, and whether its frame is progressive.
struct JpegLayout {
    eoi: usize,
    progressive: bool,
}

/// Walks the JPEG marker structure (skipping segment payloads by their length, so an EXIF
/// thumbnail's markers are not mistaken for ours) up to the end-of-image marker. Trailing bytes
/// after it are allowed, as many cameras append data there. `None`: no end marker.
fn jpeg_layout(bytes: &[u8]) -> Option<JpegLayout> {
    let n = bytes.len();
    let mut i = 2; // past SOI, which format guessing has already checked
    let mut progressive = false;
    while i + 1 < n {
        if bytes[i] != 0xFF {
            // Entropy-coded scan data (or junk between segments): jump to the next 0xFF.
            i += bytes[i..].iter().position(|&b| b == 0xFF)?;
            continue;
        }
        match bytes[i + 1] {
            0xD9 => {
                return Some(JpegLayout {
                    eoi: i,
                    progressive,
                })
            }
            // Fill byte: the marker starts at the next 0xFF.
            0xFF => i += 1,
            // Stuffed zero inside scan data, restart markers, TEM: no payload.
            0x00 | 0x01 | 0xD0..=0xD7 => i += 2,
            marker => {
                // SOF2, SOF6, SOF10, SOF14: progressive frames.
                progressive |= matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                if i + 3 >= n {
                    return None;
                }
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                if len < 2 {
                    return None;
                }
                i += 2 + len;
            }
        }
    }
    None
}

fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    jpeg_layout(bytes).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::bmp::BmpEncoder;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ExtendedColorType, ImageBuffer, ImageEncoder, Luma, LumaA, Rgb, Rgba};

    const LIMITS: DecodeLimits = DecodeLimits {
        max_side: 4096,
        max_decoded_bytes: 64 << 20,
    };

    fn kind_of(r: Result<RgbImage, ApiError>) -> (ErrorKind, String) {
        match r {
            Ok(img) => panic!(
                "expected an error, decoded {}x{}",
                img.width(),
                img.height()
            ),
            Err(e) => (e.kind, e.message),
        }
    }

    fn png(data: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, w, h, color)
            .unwrap();
        out
    }

    /// A 64x48 RGB test picture whose left half is red and right half blue, with a gradient so
    /// a wrong orientation or channel order is visible.
    fn test_rgb() -> RgbImage {
        ImageBuffer::from_fn(64, 48, |x, y| {
            if x < 32 {
                Rgb([200, (y * 2) as u8, 20])
            } else {
                Rgb([20, (y * 2) as u8, 200])
            }
        })
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A PNG whose header declares 30000x30000 grey pixels (900 MB decoded) but whose IDAT only
    /// holds the first row: a few hundred bytes on the wire. Built by encoding one row and then
    /// rewriting the IHDR height (and its CRC).
    fn png_bomb() -> Vec<u8> {
        let row = vec![0u8; 30_000];
        let mut data = png(&row, 30_000, 1, ExtendedColorType::L8);
        // signature (8) + length (4) + "IHDR" (4) + width (4) -> height at 20..24
        assert_eq!(&data[12..16], b"IHDR");
        data[20..24].copy_from_slice(&30_000u32.to_be_bytes());
        let crc = crc32(&data[12..29]);
        data[29..33].copy_from_slice(&crc.to_be_bytes());
        data
    }

    #[test]
    fn decompression_bomb_is_refused_from_the_header() {
        let bomb = png_bomb();
        assert!(bomb.len() < 4096, "bomb is {} bytes", bomb.len());
        let (kind, msg) = kind_of(decode(&bomb, &LIMITS));
        assert_eq!(kind, ErrorKind::ImageTooLarge, "{msg}");

        // Even when the side limit would allow it, the byte budget refuses it before decoding:
        // a full decode would have failed on the missing rows with BadImage instead.
        let wide = DecodeLimits {
            max_side: 40_000,
            max_decoded_bytes: 64 << 20,
        };
        let (kind, msg) = kind_of(decode(&bomb, &wide));
        assert_eq!(kind, ErrorKind::ImageTooLarge, "{msg}");
        assert!(msg.contains("30000x30000"), "{msg}");
    }

    #[test]
    fn side_limit_applies_to_every_format() {
        let img = test_rgb();
        let small = DecodeLimits {
            max_side: 32,
            max_decoded_bytes: 64 << 20,
        };
        for bytes in [
            jpeg(&img),
            png(img.as_raw(), 64, 48, ExtendedColorType::Rgb8),
        ] {
            let (kind, msg) = kind_of(decode(&bytes, &small));
            assert_eq!(kind, ErrorKind::ImageTooLarge, "{msg}");
        }
        let tight = DecodeLimits {
            max_side: 4096,
            max_decoded_bytes: 64 * 48 * 3 - 1,
        };
        let (kind, _) = kind_of(decode(&jpeg(&img), &tight));
        assert_eq!(kind, ErrorKind::ImageTooLarge);
    }

    #[test]
    fn empty_text_and_unknown_bytes_are_bad_images() {
        let (kind, msg) = kind_of(decode(&[], &LIMITS));
        assert_eq!(kind, ErrorKind::BadImage);
        assert!(msg.contains("empty"), "{msg}");

        for bytes in [
            &b"hello, this is not an image"[..],
            &[0u8; 100][..],
            b"GIF89a\x01\x00\x01\x00",
        ] {
            let (kind, msg) = kind_of(decode(bytes, &LIMITS));
            assert_eq!(kind, ErrorKind::BadImage);
            assert_eq!(msg, UNKNOWN_FORMAT);
        }
    }

    #[test]
    fn truncated_and_corrupt_data_are_bad_images() {
        let full = jpeg(&test_rgb());
        assert!(decode(&full, &LIMITS).is_ok());
        for cut in [2, 20, full.len() / 2, full.len() - 2] {
            let (kind, msg) = kind_of(decode(&full[..cut], &LIMITS));
            assert_eq!(kind, ErrorKind::BadImage, "cut at {cut}: {msg}");
        }
        // Trailing garbage after the end marker is tolerated (cameras append data there).
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"trailer");
        assert!(decode(&trailing, &LIMITS).is_ok());

        let img = test_rgb();
        let p = png(img.as_raw(), 64, 48, ExtendedColorType::Rgb8);
        for cut in [4, 30, p.len() / 2, p.len() - 13] {
            let (kind, msg) = kind_of(decode(&p[..cut], &LIMITS));
            assert_eq!(kind, ErrorKind::BadImage, "png cut at {cut}: {msg}");
        }
        let mut corrupt = p.clone();
        for b in corrupt[60..].iter_mut().take(40) {
            *b ^= 0x5A;
        }
        let (kind, _) = kind_of(decode(&corrupt, &LIMITS));
        assert_eq!(kind, ErrorKind::BadImage);
    }

    #[test]
    fn every_prefix_of_every_format_fails_cleanly() {
        // No prefix of a valid file may panic or decode to something that pretends to be whole.
        let img = test_rgb();
        let mut files = vec![
            ("jpeg", jpeg(&img)),
            ("png", png(img.as_raw(), 64, 48, ExtendedColorType::Rgb8)),
        ];
        let mut bmp = Vec::new();
        BmpEncoder::new(&mut bmp)
            .encode(img.as_raw(), 64, 48, ExtendedColorType::Rgb8)
            .unwrap();
        files.push(("bmp", bmp));
        let mut webp = Vec::new();
        WebPEncoder::new_lossless(&mut webp)
            .encode(img.as_raw(), 64, 48, ExtendedColorType::Rgb8)
            .unwrap();
        files.push(("webp", webp));
        for (what, bytes) in files {
            let whole = decode(&bytes, &LIMITS).unwrap();
            assert_eq!(whole.dimensions(), (64, 48), "{what} round trip");
            // Only JPEG is lossy.
            assert!(what == "jpeg" || whole == img, "{what} changed the pixels");
            for cut in (0..bytes.len()).step_by(7) {
                if let Ok(out) = decode(&bytes[..cut], &LIMITS) {
                    panic!(
                        "{what} prefix of {cut} bytes decoded to {}x{}",
                        out.width(),
                        out.height()
                    );
                }
            }
        }
    }

    #[test]
    fn lossless_formats_round_trip_to_the_same_pixels() {
        let img = test_rgb();
        let p = png(img.as_raw(), 64, 48, ExtendedColorType::Rgb8);
        assert_eq!(decode(&p, &LIMITS).unwrap(), img);
        let j = decode(&jpeg(&img), &LIMITS).unwrap();
        assert_eq!(j.dimensions(), (64, 48));
        let diff: u64 = j
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum();
        assert!(
            diff as f64 / (64.0 * 48.0 * 3.0) < 3.0,
            "jpeg q95 mean diff too large"
        );
    }

    #[test]
    fn grey_alpha_and_16_bit_become_8_bit_rgb() {
        let grey: ImageBuffer<Luma<u8>, Vec<u8>> =
            ImageBuffer::from_fn(10, 6, |x, y| Luma([(x * 20 + y) as u8]));
        let out = decode(&png(grey.as_raw(), 10, 6, ExtendedColorType::L8), &LIMITS).unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            let g = grey.get_pixel(x, y)[0];
            assert_eq!(p.0, [g, g, g]);
        }

        let ga: ImageBuffer<LumaA<u8>, Vec<u8>> =
            ImageBuffer::from_fn(10, 6, |x, _| LumaA([(x * 25) as u8, 7]));
        let out = decode(&png(ga.as_raw(), 10, 6, ExtendedColorType::La8), &LIMITS).unwrap();
        assert_eq!(out.get_pixel(4, 2).0, [100, 100, 100]);

        let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_fn(10, 6, |x, y| {
            Rgba([x as u8 * 10, y as u8 * 10, 99, (x * 20) as u8])
        });
        let out = decode(
            &png(rgba.as_raw(), 10, 6, ExtendedColorType::Rgba8),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(out.dimensions(), (10, 6));
        assert_eq!(out.get_pixel(3, 5).0, [30, 50, 99]);
        assert_eq!(
            out.get_pixel(0, 0).0,
            [0, 0, 99],
            "fully transparent pixel keeps its colour"
        );

        let mut rgb16 = Vec::new();
        for v in [0u16, 0x8080, 0xFFFF, 0x1234, 0x0101, 0xFEFE] {
            rgb16.extend_from_slice(&v.to_ne_bytes());
        }
        let out = decode(&png(&rgb16, 2, 1, ExtendedColorType::Rgb16), &LIMITS).unwrap();
        assert_eq!(out.as_raw(), &[0, 128, 255, 0x12, 1, 0xFE]);
    }

    /// Inserts an APP1 EXIF segment carrying only an orientation tag right after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\x00\x2A\x00\x00\x00\x08"); // big-endian, IFD0 at offset 8
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]); // value padding
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut payload = b"Exif\x00\x00".to_vec();
        payload.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn is_red(p: &Rgb<u8>) -> bool {
        p[0] > 150 && p[2] < 70
    }
    fn is_blue(p: &Rgb<u8>) -> bool {
        p[2] > 150 && p[0] < 70
    }

    #[test]
    fn exif_orientation_is_applied() {
        let plain = jpeg(&test_rgb());
        let upright = decode(&with_exif_orientation(&plain, 1), &LIMITS).unwrap();
        assert_eq!(upright.dimensions(), (64, 48));
        assert!(is_red(upright.get_pixel(2, 24)) && is_blue(upright.get_pixel(61, 24)));

        // 6 = rotate 90 degrees clockwise: the red left half becomes the top half.
        let rotated = decode(&with_exif_orientation(&plain, 6), &LIMITS).unwrap();
        assert_eq!(rotated.dimensions(), (48, 64));
        assert!(
            is_red(rotated.get_pixel(24, 2)),
            "top should be red: {:?}",
            rotated.get_pixel(24, 2)
        );
        assert!(is_blue(rotated.get_pixel(24, 61)), "bottom should be blue");
        // The gradient runs along y in the source; after a clockwise turn it runs right-to-left.
        assert!(rotated.get_pixel(45, 10)[1] < rotated.get_pixel(2, 10)[1]);

        // 3 = rotate 180 degrees: red moves to the right.
        let flipped = decode(&with_exif_orientation(&plain, 3), &LIMITS).unwrap();
        assert_eq!(flipped.dimensions(), (64, 48));
        assert!(is_blue(flipped.get_pixel(2, 24)) && is_red(flipped.get_pixel(61, 24)));
    }

    #[test]
    fn jpeg_cut_short_with_an_end_marker_appended_is_a_bad_image() {
        // A photo-like picture, so the scan data is long enough to cut in half.
        let img: RgbImage = ImageBuffer::from_fn(256, 256, |x, y| {
            Rgb([(x ^ y) as u8, (x * 3 + y) as u8, (y * 7) as u8])
        });
        let full = jpeg(&img);
        assert!(decode(&full, &LIMITS).is_ok());
        let mut cut = full[..full.len() / 2].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        assert!(jpeg_has_end_marker(&cut));
        let (kind, msg) = kind_of(decode(&cut, &LIMITS));
        assert_eq!(kind, ErrorKind::BadImage, "{msg}");
    }

    #[test]
    fn real_photos_decode_to_the_same_pixels_as_the_lenient_decoder() {
        // The strict JPEG path must not refuse or change a real photo: every 7th LFW and
        // CelebA file, against `image`'s own (lenient) JPEG decoding.
        let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
        let mut files = Vec::new();
        for dir in ["lfw/eval", "faces-extra/celeba-aligned"] {
            let mut stack = vec![shared.join(dir)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()) {
                    if e.is_dir() {
                        stack.push(e);
                    } else if e.extension().is_some_and(|x| x == "jpg") {
                        files.push(e);
                    }
                }
            }
        }
        files.sort();
        let sample: Vec<_> = files.iter().step_by(7).take(400).collect();
        assert!(
            sample.len() >= 300,
            "shared photos missing: {}",
            files.len()
        );
        for path in sample {
            let bytes = std::fs::read(path).unwrap();
            let ours = decode(&bytes, &LIMITS).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let theirs = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert!(ours == theirs, "{path:?} decodes differently");
        }
    }

    #[test]
    fn decoded_size_reads_the_header_only() {
        let p = png(test_rgb().as_raw(), 64, 48, ExtendedColorType::Rgb8);
        assert_eq!(decoded_size(&p, &LIMITS).unwrap(), 64 * 48 * 3);
        assert_eq!(
            decoded_size(&png_bomb(), &LIMITS).unwrap_err().kind,
            ErrorKind::ImageTooLarge
        );
    }

    #[test]
    fn end_marker_walk_skips_segment_payloads() {
        let full = jpeg(&test_rgb());
        assert!(jpeg_has_end_marker(&full));
        // An EXIF block whose payload contains FF D9 must not count as the end of the image.
        let mut fake = full[..2].to_vec();
        fake.extend_from_slice(&[0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0xFF, 0xD9]);
        fake.extend_from_slice(&full[2..full.len() / 2]);
        assert!(!jpeg_has_end_marker(&fake));
        assert_eq!(kind_of(decode(&fake, &LIMITS)).0, ErrorKind::BadImage);
    }
}
