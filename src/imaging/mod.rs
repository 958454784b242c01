//! Image input: bounded decoding of uploaded bytes and the 112x112 face crop the model expects.
//!
//! Everything here runs on the request path, so every input (however malformed) must come back
//! as an `ApiError` rather than a panic, and no decoder may allocate more than the configured
//! limits allow.

mod align;
mod decode;

pub(crate) use align::fit_similarity;
pub use align::{align, parse_landmarks, Landmarks, TEMPLATE};
pub use decode::{decode, decode_admitted, decoded_size, DecodeLimits};

/// Side of the square RGB face crop the model consumes.
pub const FACE_SIZE: u32 = 112;
