//! The supervisor: fleet decisions.
