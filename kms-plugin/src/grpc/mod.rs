//! Thin gRPC layers over the domain core: convert, call, map errors in one place.

pub mod v1beta1;
pub mod v2;

use tonic::{Code, Status};

use crate::envelope::EnvelopeError;
use crate::keyring::BudgetError;
use crate::kms::KmsError;

/// The one mapping from domain errors to gRPC status codes. The apiserver does not
/// branch on codes; they and the messages are for the operator reading the logs.
pub fn to_status(err: &KmsError) -> Status {
    let code = match err {
        KmsError::NoActiveKey | KmsError::KeyRetired(_) => Code::FailedPrecondition,
        KmsError::UnknownKeyId(_) => Code::NotFound,
        KmsError::InvalidKeyId(_) | KmsError::BadAnnotation { .. } => Code::InvalidArgument,
        KmsError::Envelope(e) => match e {
            EnvelopeError::UnknownFormat(_) | EnvelopeError::WrongFormat { .. } => {
                Code::FailedPrecondition
            }
            EnvelopeError::Random(_) => Code::Internal,
            EnvelopeError::EmptyPlaintext
            | EnvelopeError::PlaintextTooLarge(_)
            | EnvelopeError::EmptyCiphertext
            | EnvelopeError::Truncated { .. }
            | EnvelopeError::BadEmbeddedKeyId(_)
            | EnvelopeError::AuthenticationFailed => Code::InvalidArgument,
        },
        KmsError::Budget(BudgetError::Exhausted { .. }) => Code::ResourceExhausted,
        KmsError::Budget(BudgetError::ReservationPending { .. })
        | KmsError::ReservationFailed { .. } => Code::Unavailable,
    };
    Status::new(code, err.to_string())
}

/// The request uid as it goes into logs: bounded, printable.
fn log_uid(uid: &str) -> &str {
    let end = uid.char_indices().nth(128).map_or(uid.len(), |(i, _)| i);
    &uid[..end]
}
