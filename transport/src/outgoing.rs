//! The outgoing queue of a process: every publish waits here, in a lane by priority, until
//! rumqttc's request queue has room for it.
//!
//! `try_publish` alone drops a message when rumqttc's queue is full, and that queue fills
//! whenever a burst is answered faster than the broker acknowledges: a flood of commands used to
//! cost a gateway its `job_ended` event and half a minute of state. Here nothing an operator
//! needs is dropped: presence, state and events go first (the `Control` lane), then answers to
//! admitted commands and requests (`Answer`), then `busy` refusals of clients over their rate
//! (`Refusal`). Retained messages are coalesced by topic, since only the latest one matters.
//! Only the refusal lane is bounded: when a flood outruns the broker, its oldest refusals are
//! dropped, counted and logged, so a client that sends at a hundred times its rate cannot make
//! a printloop process queue without bound.

use std::collections::VecDeque;

use rumqttc::{AsyncClient, ClientError, QoS, Request};

/// Which lane a publish waits in; lower lanes go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Lane {
    /// Presence, state, events, meta: what an operator and the supervisor need to see.
    #[default]
    Control,
    /// Answers to admitted commands and requests, file chunks, discovery.
    Answer,
    /// `busy` refusals of clients over their rate (bounded; the oldest go first).
    Refusal,
}

const LANES: usize = 3;

/// How many refusals wait at most.
pub const REFUSAL_CAP: usize = 10_000;

#[derive(Debug)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// The queue.
#[derive(Debug)]
pub struct Outgoing {
    /// Subscriptions go before any publish.
    subscribes: VecDeque<(String, QoS)>,
    lanes: [VecDeque<Message>; LANES],
    refusal_cap: usize,
    dropped_refusals: u64,
    coalesced: u64,
}

impl Default for Outgoing {
    fn default() -> Self {
        Self::new(REFUSAL_CAP)
    }
}

impl Outgoing {
    /// A queue that keeps at most `refusal_cap` refusals.
    pub fn new(refusal_cap: usize) -> Self {
        Self {
            subscribes: VecDeque::new(),
            lanes: Default::default(),
            refusal_cap: refusal_cap.max(1),
            dropped_refusals: 0,
            coalesced: 0,
        }
    }

    /// Queues a QoS 1 publish. A retained message replaces a queued one on the same topic (it
    /// moves to the back, so it still follows everything queued before it).
    pub fn push(&mut self, lane: Lane, topic: String, payload: Vec<u8>, retain: bool) {
        if !rumqttc::valid_topic(&topic) {
            tracing::error!(%topic, "not a valid topic name: publish dropped");
            return;
        }
        let queue = &mut self.lanes[lane as usize];
        if retain {
            if let Some(at) = queue.iter().position(|m| m.retain && m.topic == topic) {
                queue.remove(at);
                self.coalesced += 1;
            }
        }
        queue.push_back(Message {
            topic,
            payload,
            retain,
        });
        if lane == Lane::Refusal && queue.len() > self.refusal_cap {
            queue.pop_front();
            self.dropped_refusals += 1;
            if self.dropped_refusals.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped_refusals,
                    "a client floods faster than the broker takes answers: the oldest busy \
                     refusals are dropped (its messages were not carried out)"
                );
            }
        }
    }

    /// Queues a subscription (they go before every publish).
    pub fn subscribe(&mut self, filter: String, qos: QoS) {
        self.subscribes.push_back((filter, qos));
    }

    /// Hands queued requests to `client`, subscriptions first, then the highest lane first,
    /// until its request queue is full. Returns how many were handed over.
    pub fn drain(&mut self, client: &AsyncClient) -> usize {
        let mut sent = 0;
        while let Some((filter, qos)) = self.subscribes.pop_front() {
            match client.try_subscribe(filter.clone(), qos) {
                Ok(()) => sent += 1,
                Err(ClientError::TryRequest(Request::Subscribe(_))) => {
                    self.subscribes.push_front((filter, qos));
                    return sent;
                }
                Err(e) => {
                    tracing::error!(%filter, error = %e, "subscription refused by the client");
                }
            }
        }
        for queue in &mut self.lanes {
            while let Some(m) = queue.pop_front() {
                match client.try_publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload) {
                    Ok(()) => sent += 1,
                    Err(ClientError::TryRequest(Request::Publish(p)))
                    | Err(ClientError::Request(Request::Publish(p))) => {
                        // Full (or the connection task is gone): it waits for the next drain.
                        queue.push_front(Message {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                        return sent;
                    }
                    Err(_) => return sent,
                }
            }
        }
        sent
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.subscribes.len() + self.lanes.iter().map(VecDeque::len).sum::<usize>()
    }

    /// Nothing waiting?
    pub fn is_empty(&self) -> bool {
        self.subscribes.is_empty() && self.lanes.iter().all(VecDeque::is_empty)
    }

    /// Refusals dropped because a flood outran the broker.
    pub fn dropped_refusals(&self) -> u64 {
        self.dropped_refusals
    }

    /// Retained messages replaced by a newer one before they were sent.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::MqttOptions;

    /// A client whose request queue holds `cap` and is never read.
    fn client(cap: usize) -> (AsyncClient, rumqttc::EventLoop) {
        AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), cap)
    }

    fn topics(ev: &mut rumqttc::EventLoop) -> Vec<(String, Vec<u8>)> {
        ev.clean();
        ev.pending
            .drain(..)
            .filter_map(|r| match r {
                Request::Publish(p) => Some((p.topic, p.payload.to_vec())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn nothing_is_lost_when_the_client_queue_is_full_and_control_goes_first() {
        let (c, mut ev) = client(4);
        let mut q = Outgoing::default();
        for i in 0..10 {
            q.push(Lane::Answer, format!("r/{i}"), vec![], false);
        }
        q.push(Lane::Refusal, "busy".into(), vec![], false);
        q.push(Lane::Control, "events".into(), b"e1".to_vec(), false);
        q.subscribe("cmd".into(), QoS::AtLeastOnce);
        assert_eq!(q.drain(&c), 4);
        assert_eq!(q.len(), 9);
        ev.clean();
        let first: Vec<_> = ev.pending.drain(..).collect();
        assert!(matches!(&first[0], Request::Subscribe(s) if s.filters[0].path == "cmd"));
        assert!(
            matches!(&first[1], Request::Publish(p) if p.topic == "events"),
            "control before answers"
        );
        let mut seen = first.len();
        for _ in 0..10 {
            q.drain(&c);
            seen += topics(&mut ev).len();
        }
        assert_eq!(seen, 13);
        assert!(q.is_empty());
    }

    #[test]
    fn retained_messages_are_coalesced_and_keep_their_order_after_earlier_ones() {
        let (c, mut ev) = client(100);
        let mut q = Outgoing::default();
        q.push(Lane::Control, "state".into(), b"s1".to_vec(), true);
        q.push(Lane::Control, "events".into(), b"e1".to_vec(), false);
        q.push(Lane::Control, "state".into(), b"s2".to_vec(), true);
        // Events are never coalesced.
        q.push(Lane::Control, "events".into(), b"e2".to_vec(), false);
        assert_eq!(q.coalesced(), 1);
        q.drain(&c);
        let sent: Vec<_> = topics(&mut ev)
            .into_iter()
            .map(|(t, p)| format!("{t}={}", String::from_utf8_lossy(&p)))
            .collect();
        assert_eq!(sent, ["events=e1", "state=s2", "events=e2"]);
    }

    #[test]
    fn only_refusals_are_bounded() {
        let (_c, _ev) = client(1);
        let mut q = Outgoing::new(100);
        for i in 0..1_000 {
            q.push(Lane::Refusal, format!("busy/{i}"), vec![], false);
            q.push(Lane::Answer, format!("r/{i}"), vec![], false);
        }
        assert_eq!(q.dropped_refusals(), 900);
        assert_eq!(q.len(), 1_100);
        q.push(Lane::Control, "a/#".into(), vec![], false);
        assert_eq!(q.len(), 1_100, "an invalid topic is not queued");
    }
}
