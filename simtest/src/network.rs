//! Every client's broker connection: connect attempts and ConnAcks, uplink and delivery with
//! latency, loss of unacknowledged messages and wills. Keeps MQTT's order: FIFO per client and
//! direction; reordering only through redelivery and resends after a reconnect.

use std::collections::BTreeMap;

use gateway::machine::Input as GIn;
use protocol::command::{Command, CommandAction};
use protocol::{ClientId, Topic};
use supervisor::machine::Input as SIn;

use crate::broker::{Delivery, Msg};
use crate::world::{Ev, World, SUP};

/// Something the broker is asked by a client.
#[derive(Debug, Clone)]
pub(crate) enum Up {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Subscribe {
        filter: String,
        qos1: bool,
    },
}

/// A client's side of its broker connection.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// Not partitioned.
    pub(crate) up: bool,
    /// The connection the client uses (connecting or connected).
    pub(crate) conn: Option<u64>,
    /// The ConnAck arrived.
    pub(crate) connected: bool,
    pub(crate) will: Option<(String, Vec<u8>)>,
    /// Publishes and subscribes not acknowledged by the broker: sent again after a reconnect
    /// (rumqttc does), which is how a broker sees late duplicates.
    pub(crate) unacked: BTreeMap<u64, Up>,
    pub(crate) next_up: u64,
    pub(crate) attempt_pending: bool,
    pub(crate) up_fifo: u64,
    pub(crate) down_fifo: u64,
}

impl World {
    /// The broker notices a dead connection (keep-alive): the will fires.
    pub(crate) fn broker_notice(&mut self, c: usize, conn: u64) {
        if let Some((topic, payload)) = self.broker.drop_conn(c, conn) {
            self.fire_will(topic, payload);
        }
    }

    pub(crate) fn will_fire(&mut self, topic: String, payload: Vec<u8>) {
        if self.broker.up {
            let ds = self.broker.publish(&topic, &payload, true);
            self.send_all(ds);
        }
    }

    pub(crate) fn schedule_connect(&mut self, c: usize, delay: u64) {
        let p = &mut self.procs[c];
        if p.alive && !p.link.attempt_pending && p.link.conn.is_none() {
            p.link.attempt_pending = true;
            self.at(delay, Ev::ConnectAttempt(c));
        }
    }

    pub(crate) fn connect_attempt(&mut self, c: usize) {
        self.procs[c].link.attempt_pending = false;
        let p = &self.procs[c];
        if !p.alive || p.link.conn.is_some() {
            return;
        }
        if !p.link.up || !self.broker.up {
            let backoff = self.rng.range(500, 5_000);
            self.schedule_connect(c, backoff);
            return;
        }
        let will = self.procs[c].link.will.clone();
        let (conn, present, old_will, waiting) = self.broker.connect(c, will);
        self.procs[c].link.conn = Some(conn);
        if let Some((topic, payload)) = old_will {
            if self.rng.chance(0.5) {
                self.fire_will(topic, payload);
            }
        }
        let lat = self.latency();
        let t = (self.now + lat).max(self.procs[c].link.down_fifo);
        self.procs[c].link.down_fifo = t;
        self.seq += 1;
        self.queue.insert(
            (t, self.seq),
            Ev::ConnAck {
                c,
                conn,
                session_present: present,
            },
        );
        self.send_all(waiting);
    }

    pub(crate) fn fire_will(&mut self, topic: String, payload: Vec<u8>) {
        // Usually at once; sometimes late (after the client's next birth): the design says a
        // will older than the latest birth is ignored.
        let delay = if self.rng.chance(0.3) {
            self.rng.range(500, 10_000)
        } else {
            0
        };
        self.at(delay, Ev::WillFire { topic, payload });
    }

    pub(crate) fn conn_ack(&mut self, c: usize, conn: u64, session_present: bool) {
        let p = &self.procs[c];
        if !p.alive || p.link.conn != Some(conn) || !p.link.up {
            return;
        }
        if self.broker.conn_of(c) != Some(conn) {
            return;
        }
        self.procs[c].link.connected = true;
        // rumqttc sends what was never acknowledged first.
        let again: Vec<(u64, Up)> = self.procs[c]
            .link
            .unacked
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, up) in again {
            self.uplink(c, id, up);
        }
        if c == SUP {
            self.sup_arrived(SIn::Connected);
        } else if self.is_gw(c) {
            self.gw_input(Self::gw_of(c), GIn::MqttConnected { session_present });
        } else {
            let filter = self
                .topics
                .format(&Topic::ApiResponse(ClientId::new("op").expect("valid")));
            self.client_send(c, Up::Subscribe { filter, qos1: true });
        }
    }

    pub(crate) fn client_notice(&mut self, c: usize, conn: u64) {
        if !self.procs[c].alive || self.procs[c].link.conn != Some(conn) {
            return;
        }
        self.procs[c].link.conn = None;
        self.procs[c].link.connected = false;
        // What run.rs does on `MqttEvent::Down`.
        if c == SUP {
            self.sup_input(SIn::Disconnected);
            let now = self.snow();
            if let Some(m) = self.sup.machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.sup.disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
        } else if self.is_gw(c) {
            let g = Self::gw_of(c);
            self.gw_input(g, GIn::MqttDisconnected);
            let now = self.gnow(c);
            if let Some(m) = self.gws[g].machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.gws[g].disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
        }
        let backoff = self.rng.range(200, 5_000);
        self.schedule_connect(c, backoff);
    }

    /// A client hands something to its MQTT client library.
    pub(crate) fn client_send(&mut self, c: usize, up: Up) {
        let link = &mut self.procs[c].link;
        if !link.connected {
            return; // no session to queue it in: dropped (the machines re-send what matters)
        }
        link.next_up += 1;
        let id = link.next_up;
        link.unacked.insert(id, up.clone());
        self.uplink(c, id, up);
    }

    pub(crate) fn uplink(&mut self, c: usize, id: u64, up: Up) {
        let link = &self.procs[c].link;
        let (Some(conn), true) = (link.conn, link.up) else {
            return; // the bytes go nowhere; sent again after the next connect
        };
        let lat = self.latency();
        let t = (self.now + lat).max(self.procs[c].link.up_fifo);
        self.procs[c].link.up_fifo = t;
        self.seq += 1;
        self.queue
            .insert((t, self.seq), Ev::Arrive { c, conn, id, up });
    }

    pub(crate) fn arrive(&mut self, c: usize, conn: u64, id: u64, up: Up) {
        if self.broker.conn_of(c) != Some(conn) {
            return;
        }
        let ds = match up {
            Up::Publish {
                topic,
                payload,
                retain,
            } => {
                self.observe(&topic, &payload);
                self.broker.publish(&topic, &payload, retain)
            }
            Up::Subscribe { filter, qos1 } => self.broker.subscribe(c, &filter, qos1),
        };
        self.send_all(ds);
        // The acknowledgement reaches the client unless the link fails first (or, rarely, it
        // is lost): then the client sends the message again after its next connect.
        let p = &mut self.procs[c];
        if p.alive && p.link.conn == Some(conn) && p.link.up && !self.rng.chance(0.03) {
            self.procs[c].link.unacked.remove(&id);
        }
    }

    pub(crate) fn send_all(&mut self, ds: Vec<Delivery>) {
        for d in ds {
            let lat = self.latency();
            let c = d.client;
            let t = (self.now + lat).max(self.procs[c].link.down_fifo);
            self.procs[c].link.down_fifo = t;
            self.seq += 1;
            self.queue.insert((t, self.seq), Ev::Deliver(d));
        }
    }

    pub(crate) fn deliver(&mut self, d: Delivery) {
        let c = d.client;
        let p = &self.procs[c];
        let ok = p.alive
            && p.link.conn == Some(d.conn)
            && p.link.connected
            && p.link.up
            && self.broker.conn_of(c) == Some(d.conn);
        if !ok {
            return; // stays in flight (QoS 1) and comes again after a reconnect
        }
        if !d.qos1 && self.rng.chance(0.01) {
            return; // QoS 0 may be lost
        }
        if d.qos1 && !self.rng.chance(0.03) {
            self.broker.ack(c, d.conn, d.msg.id);
        }
        let Msg { topic, payload, .. } = d.msg;
        if self.is_gw(c) && self.starts_seen.len() < 64 {
            if let Ok(cmd) = Command::decode(&payload) {
                if let CommandAction::StartJob(st) = &cmd.action {
                    let g = Self::gw_of(c);
                    self.starts_seen
                        .push((g, st.job_id.clone(), topic.clone(), payload.clone()));
                }
            }
        }
        if c == SUP {
            self.sup_arrived(SIn::Message { topic, payload });
        } else if self.is_gw(c) {
            self.gw_input(Self::gw_of(c), GIn::Message { topic, payload });
        } else {
            self.operator_message(&payload);
        }
    }

    pub(crate) fn latency(&mut self) -> u64 {
        if self.slow {
            self.rng.range(200, 3_000)
        } else {
            self.rng.range(1, 30)
        }
    }
}
