//! Outbound HTTP: per-request routing to pooled upstream connections.
