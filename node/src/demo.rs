//! Demo (placeholder until the demo lands).
