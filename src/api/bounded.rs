//! Bounded deserialisation of request bodies.
//!
//! A 16 MiB body of `[0,0,0,...]` or `[[],[],...]` is millions of values; parsed into a
//! `serde_json::Value` (or buffered by an untagged enum) each costs tens of bytes, so one
//! body became hundreds of megabytes before it was refused. Here every array in a request
//! type keeps at most its cap of items and only counts (and syntax-checks) the rest, so the
//! memory a body costs is bounded by its size, not by how many values it packs.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use super::input::ImageInput;
use crate::error::{ApiError, ErrorKind};
use crate::imaging::{self, Landmarks};

/// Most images any request may carry, whatever `--max-images-per-request` says (start-up
/// refuses a larger setting): the cap on what a body can make the parser keep.
pub const MAX_IMAGES_HARD: usize = 1024;

/// A JSON array of which the first `N` items are kept; the rest are syntax-checked and
/// counted, never stored.
#[derive(Debug, Clone)]
pub struct Capped<T, const N: usize> {
    pub items: Vec<T>,
    /// Items the array had, kept or not.
    pub len: usize,
}

impl<T, const N: usize> Capped<T, N> {
    pub fn is_complete(&self) -> bool {
        self.items.len() == self.len
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The size hint comes from the client: never trust it for the allocation.
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(16));
                let mut len = 0;
                while items.len() < N {
                    match seq.next_element()? {
                        Some(item) => items.push(item),
                        None => {
                            return Ok(Capped {
                                len: items.len(),
                                items,
                            })
                        }
                    }
                }
                len += items.len();
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    len += 1;
                }
                Ok(Capped { items, len })
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// The images of a request that takes several.
pub type ImageList = Capped<ImageInput, MAX_IMAGES_HARD>;

impl ImageList {
    /// The images, refused with `too_many_images` (by their true count) above `max`.
    pub fn within(self, max: usize) -> Result<Vec<ImageInput>, ApiError> {
        if self.len > max {
            return Err(ApiError::new(
                ErrorKind::TooManyImages,
                format!("{} images in one request; the limit is {max}", self.len),
            ));
        }
        Ok(self.items)
    }
}

/// `landmarks` as sent: five `[x, y]` points are all it can hold.
pub type LandmarkInput = Capped<Capped<f64, 2>, 5>;

impl LandmarkInput {
    /// Validates the points (see `imaging::parse_landmarks`), naming the true counts of
    /// arrays that were longer than a point list can be.
    pub fn parse(&self) -> Result<Landmarks, ApiError> {
        let bad = |msg: String| ApiError::new(ErrorKind::BadLandmarks, msg);
        if !self.is_complete() {
            return Err(bad(format!(
                "expected 5 landmarks (left eye, right eye, nose tip, left mouth corner, right mouth corner), got {}",
                self.len
            )));
        }
        if let Some((i, p)) = self
            .items
            .iter()
            .enumerate()
            .find(|(_, p)| !p.is_complete())
        {
            return Err(bad(format!(
                "landmarks[{i}] must be [x, y], got {} numbers",
                p.len
            )));
        }
        let points: Vec<Vec<f64>> = self.items.iter().map(|p| p.items.clone()).collect();
        imaging::parse_landmarks(&points)
    }
}

/// An integer as JSON Schema counts them: `5`, or `5.0` (a number with no fraction).
pub fn integral<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // 2^63 is exact in f64; anything from it up does not fit.
            if v.fract() == 0.0 && v.abs() < 2f64.powi(63) {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(V)
}

impl<'de> Deserialize<'de> for ImageInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(field_identifier, rename_all = "lowercase")]
        enum Field {
            Data,
            Landmarks,
            #[serde(other)]
            Other,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageInput;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a base64 string, or an object with `data` and optional `landmarks`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ImageInput, E> {
                Ok(ImageInput::Base64(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ImageInput, E> {
                Ok(ImageInput::Base64(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageInput, A::Error> {
                let mut data: Option<String> = None;
                let mut landmarks: Option<Option<LandmarkInput>> = None;
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Data if data.is_some() => {
                            return Err(de::Error::duplicate_field("data"))
                        }
                        Field::Data => data = Some(map.next_value()?),
                        Field::Landmarks if landmarks.is_some() => {
                            return Err(de::Error::duplicate_field("landmarks"))
                        }
                        Field::Landmarks => landmarks = Some(map.next_value()?),
                        // Unknown keys were always ignored here; they cost nothing to skip.
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let data = data.ok_or_else(|| de::Error::missing_field("data"))?;
                Ok(ImageInput::WithLandmarks {
                    data,
                    landmarks: landmarks.flatten(),
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for ImageInput {
    fn schema() -> RefOr<Schema> {
        let base64 = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .description(Some(
                    "Base64 (standard alphabet, padding optional, `data:image/...;base64,` prefix allowed) of a JPEG, PNG, WebP or BMP file",
                ))
        };
        let point = ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::Number))
            .min_items(Some(2))
            .max_items(Some(2));
        let landmarks = ArrayBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                Type::Array,
                Type::Null,
            ]))
            .items(point)
            .min_items(Some(5))
            .max_items(Some(5))
            .description(Some(
                "Left eye, right eye, nose tip, left and right mouth corners, as [x, y] in image pixels",
            ));
        OneOfBuilder::new()
            .item(base64())
            .item(
                ObjectBuilder::new()
                    .property("data", base64())
                    .required("data")
                    .property("landmarks", landmarks),
            )
            .into()
    }
}

impl utoipa::ToSchema for ImageInput {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_arrays_keep_n_items_and_count_the_rest() {
        let c: Capped<u8, 3> = serde_json::from_str("[1,2,3,4,5]").unwrap();
        assert_eq!((c.items, c.len), (vec![1, 2, 3], 5));
        let c: Capped<u8, 3> = serde_json::from_str("[1]").unwrap();
        assert!(c.is_complete());
        // Items past the cap are still checked for syntax.
        assert!(serde_json::from_str::<Capped<u8, 1>>("[1,2,}").is_err());
    }

    #[test]
    fn landmarks_beyond_five_points_are_counted_not_kept() {
        let many = format!("[{}]", vec!["[]"; 100_000].join(","));
        let l: LandmarkInput = serde_json::from_str(&many).unwrap();
        assert_eq!((l.items.len(), l.len), (5, 100_000));
        let e = l.parse().unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadLandmarks);
        assert!(e.message.contains("got 100000"), "{}", e.message);
        let l: LandmarkInput = serde_json::from_str("[[1,2,3]]").unwrap();
        #[derive(serde::Deserialize)]
        struct K {
            #[serde(deserialize_with = "integral")]
            k: i64,
        }
        let k = |t: &str| serde_json::from_str::<K>(t).map(|k| k.k).ok();
        assert_eq!((k(r#"{"k":74.0}"#), k(r#"{"k":-3}"#)), (Some(74), Some(-3)));
        assert_eq!((k(r#"{"k":1.5}"#), k(r#"{"k":1e300}"#)), (None, None));
        assert!(l.parse().unwrap_err().message.contains("got 3 numbers"));
    }

    #[test]
    fn image_input_forms() {
        let i: ImageInput = serde_json::from_str(r#""aGk=""#).unwrap();
        assert!(matches!(i, ImageInput::Base64(ref s) if s == "aGk="));
        let i: ImageInput =
            serde_json::from_str(r#"{"data": "aGk=", "landmarks": null, "x": [1]}"#).unwrap();
        assert!(matches!(
            i,
            ImageInput::WithLandmarks {
                landmarks: None,
                ..
            }
        ));
        for bad in [
            "1",
            "[]",
            "{}",
            r#"{"data": 1}"#,
            r#"{"data":"a","data":"b"}"#,
        ] {
            assert!(serde_json::from_str::<ImageInput>(bad).is_err(), "{bad}");
        }
    }
}
