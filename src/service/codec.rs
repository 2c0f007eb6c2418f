//! The codec of the generated TokenBroker code: prost, except that a request
//! that does not decode (truncated protobuf, invalid UTF-8 in a string field)
//! is INVALID_ARGUMENT, marked so [`super::malformed`] audits and counts it,
//! rather than tonic's INTERNAL, which would blame the broker and skip both.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::metadata::MetadataValue;
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// Metadata key on the status of a request that did not decode. Only
/// [`super::malformed`] reads it, and removes it before the answer leaves.
pub const MALFORMED_MARKER: &str = "x-tokenbroker-malformed";

/// [`ProstCodec`] with decode errors as INVALID_ARGUMENT (see the module docs).
/// Named in `build.rs` (`codec_path`), so the generated server and client use it.
#[derive(Debug, Clone, Copy)]
pub struct BrokerCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for BrokerCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for BrokerCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MalformedIsInvalid<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedIsInvalid {
            inner: ProstCodec::<T, U>::default().decoder(),
        }
    }
}

/// prost's decoder, with its error turned into a marked INVALID_ARGUMENT.
#[derive(Debug)]
pub struct MalformedIsInvalid<U> {
    inner: tonic_prost::ProstDecoder<U>,
}

impl<U: Message + Default + Send + 'static> Decoder for MalformedIsInvalid<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|_| malformed::<U>())
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The marked status; prost's own message is not echoed (it can quote the
/// field path and says nothing the caller can act on beyond "invalid").
fn malformed<U>() -> Status {
    let mut status = Status::invalid_argument(format!(
        "the request is not a valid {} message",
        message_name::<U>()
    ));
    status
        .metadata_mut()
        .insert(MALFORMED_MARKER, MetadataValue::from_static("1"));
    status
}

/// The message's type name without its module path, e.g. `GetIdpTokenRequest`.
pub fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}
