//! Verification (stub).
