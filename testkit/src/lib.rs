//! Test support shared by integration tests.
