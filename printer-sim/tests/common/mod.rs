pub mod bench;
pub mod client;
