//! End-to-end tests for the patchbay binary (see `tests/`).
