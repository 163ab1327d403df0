//! The one task that polls a rumqttc event loop, for every printloop client: the gateway and the
//! supervisor ([`crate::connect`]), the operator's tools, the chaos and adversarial harnesses and
//! the test client. It only **forwards** what it sees, through a channel, and never publishes
//! (bytebeamio/rumqtt#263, #1025); what differs between clients is how they reconnect
//! ([`Reconnect`]), what they subscribe to again on a clean session, and whether they want
//! acknowledgements.

use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, Publish, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{backoff, describe, oversized, refusal, refused_backoff, Refusal, AMBIGUOUS_FOR};

/// What the task reports.
#[derive(Debug)]
pub enum MqttEvent {
    /// Connected (CONNACK accepted).
    Connected {
        /// Whether the broker kept our session.
        session_present: bool,
    },
    /// A message on a subscribed topic.
    Message(Publish),
    /// A SUBACK (only when [`Forwarding::acks`] asks).
    SubAck(Vec<SubscribeReasonCode>),
    /// A PUBACK (only when [`Forwarding::acks`] asks).
    PubAck,
    /// A PUBCOMP (only when [`Forwarding::acks`] asks).
    PubComp,
    /// The connection failed or dropped.
    Down {
        /// What happened, for the log.
        error: String,
        /// The broker refused the login (the task has logged it, with the fix, and waits
        /// [`refused_backoff`] before the next attempt).
        refused: bool,
        /// With [`Reconnect::Backoff`] and a will: where to send the will of the next
        /// connection (dropping it stops the task).
        next_will: Option<oneshot::Sender<LastWill>>,
    },
}

/// How the task goes on after a connection error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// printloop's processes: a jittered backoff capped at `max`, a slow pace after a refused
    /// login, and a new will asked for at each [`MqttEvent::Down`] (when the connection has
    /// one: the supervisor's file connection has none).
    Backoff {
        /// Longest pause.
        max: Duration,
        /// Jitter seed (differs between processes, so a fleet does not reconnect in lockstep).
        seed: u64,
    },
    /// Tools that watch: the same pause every time.
    After(Duration),
    /// Tests and one-shot requests: report the error and stop.
    Never,
}

/// What a forwarding task does besides forwarding messages.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// After a connection error.
    pub reconnect: Reconnect,
    /// Subscribed again at every CONNACK (a clean session forgets subscriptions), through this
    /// client's request queue (`try_`: the task never waits on it).
    pub resubscribe: Option<(AsyncClient, Vec<SubscribeFilter>)>,
    /// Which acknowledgements to forward.
    pub acks: Acks,
}

/// Which acknowledgements a forwarding task reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// None (printloop's processes).
    None,
    /// SUBACK only (a tool that waits for its subscription).
    Subscribe,
    /// SUBACK, PUBACK and PUBCOMP (tests).
    All,
}

impl Default for Forwarding {
    fn default() -> Self {
        Forwarding {
            reconnect: Reconnect::Never,
            resubscribe: None,
            acks: Acks::None,
        }
    }
}

/// Where events go: a bounded channel (back-pressure reaches the socket: the broker holds what
/// we cannot take yet) or, for tests that read at their own pace, an unbounded one.
#[derive(Debug)]
pub enum Out {
    /// Bounded.
    Bounded(mpsc::Sender<MqttEvent>),
    /// Unbounded.
    Unbounded(mpsc::UnboundedSender<MqttEvent>),
}

impl Out {
    /// `false` once the receiver is gone.
    async fn send(&self, ev: MqttEvent) -> bool {
        match self {
            Out::Bounded(tx) => tx.send(ev).await.is_ok(),
            Out::Unbounded(tx) => tx.send(ev).is_ok(),
        }
    }
}

/// Starts the task, in the caller's span (its log lines name the printer, or the tool).
pub fn spawn(eventloop: EventLoop, forwarding: Forwarding, out: Out) -> JoinHandle<()> {
    tokio::spawn(tracing::Instrument::in_current_span(run(
        eventloop, forwarding, out,
    )))
}

/// Ends a connection whose only purpose was to drop the broker's session: a clean
/// DISCONNECT (so no will is published) and the next connection asks for the configured
/// session again, which the broker creates empty.
async fn end_discarding_connection(eventloop: &mut EventLoop, clean_session: bool) {
    if let Some(network) = eventloop.network.as_mut() {
        let bye = async {
            network.write(Packet::Disconnect).await?;
            network.flush().await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), bye)
            .await
            .unwrap_or(Ok(()))
        {
            tracing::debug!(error = %e, "DISCONNECT after the clean session not sent");
        }
    }
    eventloop.network = None;
    eventloop.mqtt_options.set_clean_session(clean_session);
}

async fn run(mut eventloop: EventLoop, f: Forwarding, out: Out) {
    let clean_session = eventloop.mqtt_options.clean_session();
    let max_packet = eventloop.mqtt_options.max_packet_size();
    let mut failures = 0u32;
    let mut refusals = 0u32;
    // Since when the connection attempts have ended before a CONNACK (see `Refusal::Ambiguous`).
    let mut ambiguous_since: Option<Instant> = None;
    let mut acked = false;
    let mut disconnecting = false;
    // A message over our packet limit breaks every connection of a persistent session: the
    // broker redelivers it each time. The only way out is a clean session, which drops it (with
    // whatever else was queued for us), then the persistent session again.
    let mut discarding = false;
    loop {
        let ev = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) if discarding => {
                discarding = false;
                end_discarding_connection(&mut eventloop, clean_session).await;
                tracing::warn!(
                    "the broker's session was dropped with the oversized message; reconnecting \
                     with a fresh session"
                );
                continue;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                ambiguous_since = None;
                acked = true;
                if refusals > 0 {
                    tracing::info!(after = refusals, "the broker accepted the login");
                    refusals = 0;
                }
                if let Some((client, filters)) = &f.resubscribe {
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::warn!(error = %e, "cannot subscribe again");
                    }
                }
                MqttEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => MqttEvent::Message(p),
            Ok(Event::Incoming(Packet::SubAck(s))) if f.acks != Acks::None => {
                MqttEvent::SubAck(s.return_codes)
            }
            Ok(Event::Incoming(Packet::PubAck(_))) if f.acks == Acks::All => MqttEvent::PubAck,
            Ok(Event::Incoming(Packet::PubComp(_))) if f.acks == Acks::All => MqttEvent::PubComp,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                disconnecting = true;
                continue;
            }
            Ok(_) => continue,
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                let refused = match refusal(&e, !acked) {
                    Refusal::Certain => true,
                    Refusal::Ambiguous => {
                        let since = *ambiguous_since.get_or_insert_with(Instant::now);
                        since.elapsed() >= AMBIGUOUS_FOR
                    }
                    Refusal::No => {
                        ambiguous_since = None;
                        false
                    }
                };
                acked = false;
                let error = if std::mem::take(&mut disconnecting) {
                    format!("closed after DISCONNECT ({})", describe(&e))
                } else {
                    describe(&e)
                };
                let delay = match f.reconnect {
                    Reconnect::Never => None,
                    Reconnect::After(d) => Some(d),
                    Reconnect::Backoff { max, seed } => Some(if let Some(len) = oversized(&e) {
                        tracing::error!(
                            len,
                            limit = max_packet,
                            "the broker delivered a message of {len} bytes, over this client's \
                             limit of {max_packet} bytes; a persistent session would get it again \
                             at every reconnect, so the next connection starts a clean session to \
                             drop it (messages queued for this client while it was away go with \
                             it). Cap the broker's packets at {} bytes (docs/broker.md)",
                            crate::BROKER_MAX_PACKET
                        );
                        discarding = !clean_session;
                        if discarding {
                            eventloop.mqtt_options.set_clean_session(true);
                        }
                        backoff(0, max, seed)
                    } else if refused {
                        refusals += 1;
                        let delay = refused_backoff(refusals, seed);
                        if refusals == 1 {
                            tracing::error!(next_try_in = ?delay, "{error}");
                        } else {
                            tracing::warn!(attempts = refusals, next_try_in = ?delay, "the broker still refuses the login");
                        }
                        delay
                    } else {
                        failures += 1;
                        backoff(failures, max, seed)
                    }),
                };
                let has_will = eventloop.mqtt_options.last_will().is_some();
                let (next_will, will_rx) = match f.reconnect {
                    Reconnect::Backoff { .. } if has_will => {
                        let (tx, rx) = oneshot::channel();
                        (Some(tx), Some(rx))
                    }
                    _ => (None, None),
                };
                let down = MqttEvent::Down {
                    error,
                    refused,
                    next_will,
                };
                if !out.send(down).await {
                    return;
                }
                if let Some(rx) = will_rx {
                    match rx.await {
                        Ok(will) => {
                            eventloop.mqtt_options.set_last_will(will);
                        }
                        Err(_) => return,
                    }
                }
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return,
                }
                continue;
            }
        };
        if !out.send(ev).await {
            return;
        }
    }
}
