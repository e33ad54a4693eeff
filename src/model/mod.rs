//! Model (stub).
