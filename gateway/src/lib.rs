//! The edge gateway: one per printer. Owns the serial link and the printer's truth, keeps it
//! durable, and stays autonomous when the network is gone.

pub mod link;
pub mod machine;
pub mod serial;
pub mod store;
