//! The tokio shell that runs the link over a serial port (in progress).
