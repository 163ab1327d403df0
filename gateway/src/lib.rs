//! The edge gateway: one per printer.
