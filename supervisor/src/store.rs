//! The supervisor redb store (in progress).
