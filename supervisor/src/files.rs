//! Content-addressed file storage (in progress).
