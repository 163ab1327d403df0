//! The simulated MQTT broker: topics and filters, retained messages, persistent sessions with
//! QoS 1 queues and in-flight messages, wills, and a restart that forgets everything (rumqttd
//! keeps no state across restarts).
//!
//! The broker only decides *what* goes where; the world schedules *when* (latency, FIFO per
//! destination) and whether the receiver was there to take it.

use std::collections::{BTreeMap, VecDeque};

/// One application message as the broker stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Broker-wide id (to find it among in-flight messages).
    pub id: u64,
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A message leaving the broker for one client.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The client (index into the world's processes).
    pub client: usize,
    /// The connection it is sent on.
    pub conn: u64,
    /// The message.
    pub msg: Msg,
    /// QoS 1 (kept in flight until acknowledged) or QoS 0.
    pub qos1: bool,
}

/// A client's session on the broker (`clean_session = false` for everyone).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Filter → QoS 1?
    pub subs: BTreeMap<String, bool>,
    /// QoS 1 messages waiting for the client to come back.
    pub queue: VecDeque<Msg>,
    /// QoS 1 messages sent on the current connection and not acknowledged yet.
    pub inflight: Vec<Msg>,
    /// The live connection, if any.
    pub conn: Option<u64>,
    /// The will of the live connection.
    pub will: Option<(String, Vec<u8>)>,
}

/// A will: topic and payload.
pub type Will = (String, Vec<u8>);

/// Largest per-session queue; beyond it new messages are dropped (brokers bound it too).
const MAX_QUEUE: usize = 2000;

/// The broker.
#[derive(Debug, Default)]
pub struct Broker {
    /// Accepting connections?
    pub up: bool,
    /// Sessions by client.
    pub sessions: BTreeMap<usize, Session>,
    /// Retained messages by topic.
    pub retained: BTreeMap<String, Vec<u8>>,
    next_conn: u64,
    next_msg: u64,
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Broker {
    /// A running broker.
    pub fn new() -> Self {
        Self {
            up: true,
            next_conn: 1,
            next_msg: 1,
            ..Self::default()
        }
    }

    /// The live connection of `client`, if any.
    pub fn conn_of(&self, client: usize) -> Option<u64> {
        if !self.up {
            return None;
        }
        self.sessions.get(&client).and_then(|s| s.conn)
    }

    /// A client connects. Returns its connection id, whether its session was kept, the will of
    /// a connection it took over (if the caller lets that will fire), and what is waiting for
    /// it (in-flight first, then the queue).
    pub fn connect(
        &mut self,
        client: usize,
        will: Option<(String, Vec<u8>)>,
    ) -> (u64, bool, Option<Will>, Vec<Delivery>) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let present = self.sessions.contains_key(&client);
        let s = self.sessions.entry(client).or_default();
        let mut old_will = None;
        if s.conn.take().is_some() {
            // Session take-over: the old connection is closed uncleanly.
            old_will = s.will.take();
        }
        let mut waiting: Vec<Msg> = std::mem::take(&mut s.inflight);
        waiting.extend(s.queue.drain(..));
        s.conn = Some(conn);
        s.will = will;
        let mut out = Vec::new();
        for msg in waiting {
            s.inflight.push(msg.clone());
            out.push(Delivery {
                client,
                conn,
                msg,
                qos1: true,
            });
        }
        (conn, present, old_will, out)
    }

    /// The broker noticed `conn` of `client` is dead (keep-alive): returns its will.
    pub fn drop_conn(&mut self, client: usize, conn: u64) -> Option<(String, Vec<u8>)> {
        if !self.up {
            return None;
        }
        let s = self.sessions.get_mut(&client)?;
        if s.conn != Some(conn) {
            return None;
        }
        s.conn = None;
        // Unacknowledged messages go back to the front of the queue.
        let inflight = std::mem::take(&mut s.inflight);
        for m in inflight.into_iter().rev() {
            s.queue.push_front(m);
        }
        s.will.take()
    }

    /// The client acknowledged a QoS 1 message.
    pub fn ack(&mut self, client: usize, conn: u64, id: u64) {
        if let Some(s) = self.sessions.get_mut(&client) {
            if s.conn == Some(conn) {
                s.inflight.retain(|m| m.id != id);
            }
        }
    }

    /// A publish arrives (from a client or a will). Returns the deliveries to connected
    /// subscribers; offline persistent sessions queue QoS 1 messages.
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) -> Vec<Delivery> {
        if retain {
            if payload.is_empty() {
                self.retained.remove(topic);
            } else {
                self.retained.insert(topic.to_owned(), payload.to_vec());
            }
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let msg = Msg {
            id,
            topic: topic.to_owned(),
            payload: payload.to_vec(),
        };
        let mut out = Vec::new();
        for (client, s) in self.sessions.iter_mut() {
            let mut matched = false;
            let mut qos1 = false;
            for (f, q) in &s.subs {
                if matches(f, topic) {
                    matched = true;
                    qos1 |= *q;
                }
            }
            if !matched {
                continue;
            }
            match s.conn {
                Some(conn) => {
                    if qos1 {
                        s.inflight.push(msg.clone());
                    }
                    out.push(Delivery {
                        client: *client,
                        conn,
                        msg: msg.clone(),
                        qos1,
                    });
                }
                None if qos1 && s.queue.len() < MAX_QUEUE => s.queue.push_back(msg.clone()),
                None => {}
            }
        }
        out
    }

    /// A subscription arrives: returns the retained messages it matches.
    pub fn subscribe(&mut self, client: usize, filter: &str, qos1: bool) -> Vec<Delivery> {
        let Some(s) = self.sessions.get_mut(&client) else {
            return Vec::new();
        };
        s.subs.insert(filter.to_owned(), qos1);
        let Some(conn) = s.conn else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (topic, payload) in &self.retained {
            if matches(filter, topic) {
                let msg = Msg {
                    id: self.next_msg,
                    topic: topic.clone(),
                    payload: payload.clone(),
                };
                self.next_msg += 1;
                if qos1 {
                    s.inflight.push(msg.clone());
                }
                out.push(Delivery {
                    client,
                    conn,
                    msg,
                    qos1,
                });
            }
        }
        out
    }

    /// A restart with amnesia: every session, queue and retained message is gone; nobody's
    /// will fires (the broker died with them).
    pub fn crash(&mut self) {
        self.up = false;
        self.sessions.clear();
        self.retained.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn offline_session_queues_qos1_and_redelivers_in_flight() {
        let mut b = Broker::new();
        let (c1, present, _, _) = b.connect(7, None);
        assert!(!present);
        assert!(b.subscribe(7, "t/+", true).is_empty());
        let d = b.publish("t/x", b"1", false);
        assert_eq!(d.len(), 1);
        assert!(b.drop_conn(7, c1).is_none());
        b.publish("t/x", b"2", true);
        let (_, present, _, waiting) = b.connect(7, None);
        assert!(present);
        let payloads: Vec<&[u8]> = waiting.iter().map(|d| d.msg.payload.as_slice()).collect();
        assert_eq!(payloads, vec![b"1".as_slice(), b"2".as_slice()]);
        b.crash();
        assert!(b.retained.is_empty() && b.sessions.is_empty());
    }
}
