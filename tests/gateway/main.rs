//! The gateway's integration tests, one module per area, built as one test binary: a binary per file
//! would link the gateway and its dependencies a dozen times over (a dozen links, and about 70 MB of disk
//! each). `cargo test --test gateway jwks::` runs one area.
//!
//! `tests/example.rs` stays a binary of its own: it sets process environment variables, which is only
//! sound where no other test runs alongside.

mod support;

mod admin;
mod binding;
mod config;
mod explain;
mod hostile;
mod introspection;
mod jwks;
mod jwt;
mod lifecycle;
mod proxy;
mod residency;
mod tls;
