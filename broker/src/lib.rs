//! Embedded rumqttd.
