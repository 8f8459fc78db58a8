//! Inbound HTTP: per-request authorization and forwarding to the local app.
