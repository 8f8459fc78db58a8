//! The ADS stream's gRPC framing, done here rather than by tonic's
//! generated client so that memory does not grow with the mesh.
//!
//! tonic's `Streaming` keeps its read buffer at the size of the largest
//! message it has decoded, for the life of the stream. Consul sends every
//! cluster of the mesh in one `DeltaDiscoveryResponse` (about 4.3 MB at
//! 2,000 upstreams), so a sidecar would hold that much for as long as it
//! is connected. [`Responses`] gives a buffer back once the message that
//! grew it is decoded. The channel, TLS, HTTP/2 and errors (as
//! [`tonic::Status`]) are still tonic's.
//!
//! The framing is gRPC's length-prefixed message: one byte (compressed or
//! not), a big-endian `u32` length, then the protobuf bytes; the call ends
//! with `grpc-status` in the trailers, or in the headers of a
//! trailers-only answer.
use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

/// The method Consul (and consul-dataplane) serve Delta ADS on.
pub const PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// A read buffer larger than this is given back once it is empty.
pub const KEEP_BUFFER: usize = 64 * 1024;

const HEADER: usize = 5;

/// One gRPC message frame.
pub fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(HEADER + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("the buffer has room");
    b.freeze()
}

/// Opens the stream: `requests` are sent as they come, in order.
pub async fn open(
    channel: Channel,
    metadata: &[(AsciiMetadataKey, AsciiMetadataValue)],
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    max_message: usize,
) -> Result<Responses, Status> {
    let body = StreamBody::new(
        UnboundedReceiverStream::new(requests)
            .map(|r| Ok::<_, std::convert::Infallible>(http_body::Frame::data(frame(&r)))),
    );
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(
            http::header::USER_AGENT,
            concat!("veer/", env!("CARGO_PKG_VERSION")),
        )
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("request: {e}")))?;
    for (k, v) in metadata {
        let name = http::HeaderName::from_bytes(k.as_str().as_bytes())
            .map_err(|e| Status::internal(format!("metadata {k}: {e}")))?;
        let value = http::HeaderValue::from_bytes(v.as_encoded_bytes())
            .map_err(|e| Status::internal(format!("metadata {k}: {e}")))?;
        req.headers_mut().insert(name, value);
    }
    let resp = channel
        .oneshot(req)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (head, body) = resp.into_parts();
    if let Some(s) = Status::from_header_map(&head.headers) {
        // A trailers-only answer: the call ended before it began.
        if s.code() != Code::Ok {
            return Err(s);
        }
        return Err(Status::unavailable("the server ended the stream at once"));
    }
    if head.status != http::StatusCode::OK {
        return Err(from_http(head.status));
    }
    Ok(Responses {
        body,
        buf: BytesMut::new(),
        max_message,
        ended: false,
    })
}

/// What an HTTP status without `grpc-status` means (gRPC's
/// "HTTP to gRPC status code mapping").
fn from_http(s: http::StatusCode) -> Status {
    let code = match s.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {s} without grpc-status"))
}

/// The server's side of the stream.
pub struct Responses {
    body: tonic::body::Body,
    buf: BytesMut,
    max_message: usize,
    ended: bool,
}

/// A complete message at the front of `buf`, if there is one.
pub fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, Status> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Status::internal(
            "a compressed message, but no compression was asked for",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "a message of {len} bytes, over the limit of {max}"
        )));
    }
    if buf.len() < HEADER + len {
        buf.reserve(HEADER + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER);
    let msg = buf.split_to(len).freeze();
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = BytesMut::new();
    }
    Ok(Some(msg))
}

impl Responses {
    /// The next response; `None` when the server ended the stream with
    /// status OK. Cancel-safe: what was read stays in `self`.
    pub async fn message(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        loop {
            if let Some(msg) = take_message(&mut self.buf, self.max_message)? {
                let r = DeltaDiscoveryResponse::decode(msg)
                    .map_err(|e| Status::internal(format!("decoding a response: {e}")));
                return r.map(Some);
            }
            if self.ended {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal("the stream ended inside a message"))
                };
            }
            match self.body.frame().await {
                None => {
                    self.ended = true;
                    if self.buf.is_empty() {
                        // No trailers: tonic calls this a protocol error.
                        return Err(Status::internal("the stream ended without grpc-status"));
                    }
                }
                Some(Err(s)) => return Err(s),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        self.ended = true;
                        let trailers = f.into_trailers().unwrap_or_default();
                        match Status::from_header_map(&trailers) {
                            Some(s) if s.code() != Code::Ok => return Err(s),
                            Some(_) => {}
                            None => {
                                return Err(Status::internal(
                                    "the stream ended without grpc-status",
                                ))
                            }
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
